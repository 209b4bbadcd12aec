"""Profiling: attention FLOPs are counted, analytic FLOPs match, flags are restored, timings are sane."""
import pytest
import torch

from bench import BenchError
from bench.models.clip import Transformer
from bench.flops import count_flops
from bench.profile import count_params, precision_context, summarize_times, time_fn, with_crop_count


def test_attention_flops_are_counted_exactly():
    width, tokens, layers, heads = 64, 50, 2, 4
    model = Transformer(width, layers, heads).eval()
    x = torch.randn(1, tokens, width)
    flops = count_flops(lambda: model(x))
    linear_macs = layers * tokens * (3 * width * width + width * width + 2 * 4 * width * width)
    attention_macs = layers * 2 * tokens * tokens * width  # QK^T and AV
    assert flops == 2 * (linear_macs + attention_macs)


def test_attention_with_additive_bias_is_counted():
    model = Transformer(32, 1, 2).eval()
    x = torch.randn(1, 10, 32)
    bias = torch.zeros(1, 2, 10, 10)
    assert count_flops(lambda: model(x, bias)) == count_flops(lambda: model(x))


def test_param_counts_by_prefix():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    model.register_buffer("buf", torch.zeros(5))
    c = count_params(model, trainable_prefixes=("1.",), text_prefixes=("0.",))
    assert c == {"params_state_total": 9 + 4 + 5, "params_total": 13, "params_trainable": 4, "params_image_path": 4}


def test_precision_flags_restored_and_unknown_refused():
    before = torch.get_float32_matmul_precision()
    with precision_context("tf32", torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with precision_context("amp_bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(BenchError, match="fp32"):
        with precision_context("fp8", torch.device("cpu")):
            pass


def test_timing_and_summary():
    times = time_fn(lambda: torch.ones(64, 64) @ torch.ones(64, 64), torch.device("cpu"), warmup=1, iters=5)
    assert len(times) == 5 and all(t > 0 for t in times)
    s = summarize_times([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["median"] == 3.0 and s["p90"] == pytest.approx(7.6)


def test_crop_totals():
    fig = {"has_crops": True, "gflops_model_fixed": 10.0, "gflops_end_to_end_fixed": 12.0, "gflops_per_crop": 2.0,
           "latency_ms_model_fixed": 5.0, "latency_ms_end_to_end_fixed": 6.0, "latency_ms_per_crop": 1.0,
           "latency_ms_model_p90_fixed": 7.0, "latency_ms_end_to_end_p90_fixed": 8.0}
    out = with_crop_count(fig, 3.5)
    assert out["gflops_model"] == 17.0 and out["latency_ms_end_to_end_median"] == 9.5
    assert out["latency_ms_model_p90"] == 10.5
    assert with_crop_count(fig, None)["gflops_model"] == 210.0


def test_compute_floor_from_measured_peak():
    from bench.profile import add_floor, measure_peak

    peak = measure_peak(torch.device("cpu"), "fp32", n=256, warmup=1, reps=3)
    assert peak > 0.1
    out = add_floor({"gflops_model": 10.0, "latency_ms_model_median": 200.0}, 100.0)
    assert out["floor_ms_model"] == 100.0 and out["latency_over_floor_model"] == 2.0
    assert "floor_ms_end_to_end" not in out


@pytest.mark.parametrize("family", ["catseg", "san"])
def test_flops_at_each_vocabulary_size_from_shapes_equal_real_counts(family):
    """`model_flops_at_k` (fake tensors, the encoded names repeated to K) gives what a real encode + forward of K
    other names counts, for K below and above CAT-Seg's pad_len, and leaves the model's own vocabulary and outputs
    as they were."""
    import numpy as np

    from bench.efficiency import dataset_k_figures, model_flops_at_k
    from bench.models import create_model
    from test_catseg import TINY as TINY_CATSEG
    from test_san import TINY as TINY_SAN

    builder, tiny = {"catseg": ("catseg_vit_b_16", TINY_CATSEG), "san": ("san_vit_b_16", TINY_SAN)}[family]
    torch.manual_seed(0)
    model = create_model(builder, **tiny).eval()
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3)).astype(np.uint8)
    own = ["sky", "road", "dog"]
    with torch.inference_mode():
        model.encode_vocabulary(own)
        before = model.predict([image])[0]
    at_k = model_flops_at_k(model, image, {3, 5, 11})
    assert set(at_k) == {"3", "5", "11"} and at_k["3"] < at_k["11"]
    assert model.vocabulary == own
    with torch.inference_mode():
        assert torch.equal(model.predict([image])[0], before)
        x, sizes = model.preprocess([image])
        for k in (5, 11):
            model.encode_vocabulary([f"class {i}" for i in range(k)])
            with model.published_computation():
                assert count_flops(lambda: model(x, sizes)) / 1e9 == pytest.approx(at_k[str(k)], rel=1e-12)
    rec = {"gflops_model": 100.0, "profile_vocabulary_size": 3, "gflops_model_at_k": at_k}
    assert dataset_k_figures(rec, 3)["gflops_model_dataset_k"] == 100.0
    assert dataset_k_figures(rec, 11) == {"dataset_vocabulary_size": 11,
                                          "gflops_model_dataset_k": 100.0 + at_k["11"] - at_k["3"]}
    assert dataset_k_figures(rec, 7)["gflops_model_dataset_k"] is None         # no figure for that K: none shown


def test_timing_stops_at_the_budget_and_the_record_says_how_many_were_timed():
    import time

    from bench.profile import cpu_latency_budget, timed

    times, _ = timed(lambda: time.sleep(0.05), torch.device("cpu"), warmup=0, iters=10, budget_s=0.12)
    assert 1 <= len(times) <= 3 and sum(times) >= 120.0 - 1e-6 or len(times) == 3
    assert len(timed(lambda: None, torch.device("cpu"), 0, 5, budget_s=60.0)[0]) == 5      # fast: all of them
    assert cpu_latency_budget(torch.device("cpu"), None) == 20.0
    assert cpu_latency_budget(torch.device("cpu"), 3) is None            # an explicit profile.iters is timed in full


def test_a_slow_forward_is_not_warmed_up_twice():
    from bench.profile import _warmup_of

    assert _warmup_of("end_to_end", 1, {"model": [25_000.0]}, budget_s=20.0) == 0   # 25 s calls: already warm
    assert _warmup_of("end_to_end", 1, {"model": [700.0] * 3}, budget_s=20.0) == 1  # SAN-B: warmed as usual
    assert _warmup_of("end_to_end", 1, {"model": [25_000.0]}, budget_s=None) == 1   # explicit iters: as asked
    assert _warmup_of("model", 1, {}, budget_s=20.0) == 1


def test_the_uncached_text_cost_runs_the_text_tower_for_the_count_and_for_the_timing():
    """Models keep the features of names already encoded: both the FLOP count and the timing must miss that, or
    the seconds would time a dictionary lookup (they did: 0.03 s for SAN-B's 150 classes x 14 templates)."""
    from bench.efficiency import text_encoding_cost
    from bench.models import create_model
    from test_san import TINY as TINY_SAN

    torch.manual_seed(0)
    model = create_model("san_vit_b_16", **TINY_SAN).eval()
    calls = []
    model.ov_classifier.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        model.encode_vocabulary(["sky"])               # a name seen before the cost is measured
    calls.clear()
    cost = text_encoding_cost(model, ["sky", "road"])
    assert len(calls) == 2 and cost["gflops_text"] > 0 and cost["text_encode_s_uncached"] > 0


def test_scopes_take_a_compiled_runner():
    """`compile=default` cells hand scope_fns a torch.compile'd module, which refuses bool() (it has no len()):
    the scopes must take it as the runner (a make bench-cpu compile cell failed with "SAN does not support len()").
    The runner is not called here (compiling takes minutes on a CPU); the closures must only be built with it."""
    import numpy as np

    from bench.models import create_model
    from bench.profile import scope_fns
    from test_san import TINY as TINY_SAN

    torch.manual_seed(0)
    model = create_model("san_vit_b_16", **TINY_SAN).eval()
    compiled = torch.compile(model)
    with pytest.raises(TypeError):
        bool(compiled)
    fns = scope_fns(model, np.zeros((32, 32, 3), np.uint8), crop_batch=1, runner=compiled)
    assert set(fns) == {"model", "end_to_end"}
