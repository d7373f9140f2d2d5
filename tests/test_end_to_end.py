"""End to end on the real SmolLM2-135M-Instruct: self-made multi-chunk questions, blended reuse vs a
full prefill of the same prompt (teacher-forced KL over the full prefill's greedy answer)."""

import statistics

import pytest
import torch

from ragkv.engine.engine import Engine
from ragkv.eval.datasets import Sample
from ragkv.eval.runner import Spec, evaluate_sample

pytestmark = pytest.mark.slow

_CHUNKS = [
    "Orla Venn was a glassblower born in Marrowgate in 1871. She trained in her uncle's workshop beside the harbour "
    "and later built a lighthouse lantern made of green glass, which still stands on the northern pier. Sailors "
    "said its light could be seen from the Tarn islands on a clear night, and the town council paid her in salt cod.",
    "Tobias Krell, a clockmaker from Eastwick Ferry, was born in 1902. His most famous piece is a clock that runs "
    "backwards on Sundays; it hangs in the ferry office. Krell repaired church bells in the winter months and "
    "wrote a short book about escapements that his apprentices copied by hand.",
    "The botanist Imke Solberg grew up in Harrowden, a village of hop farms, and was born in 1888. On an expedition "
    "to the Velm marshes she described a blue orchid that smells of pepper. Her herbarium of four thousand sheets "
    "was donated to the college at Harrowden after her death.",
    "Dario Feld was a cartographer born in Little Ashby in 1856. He spent eleven years mapping the underground rivers "
    "of Lyme with a lantern, a rope and a brass compass. His map was printed in six colours and sold to mining "
    "companies, who used it to avoid flooded seams.",
    "Wen Calloway, born in Port Selden in 1913, became the first woman to run the shipyard there. She designed a "
    "three-masted schooner called the Heron, which carried timber along the coast for forty years. The Heron was "
    "finally broken up in 1961, and its figurehead is kept in the harbour museum.",
    "Ansel Brook, an astronomer from Corrib Hill, was born in 1897. Using a telescope he ground himself, he found a "
    "comet that returns every 41 years, now named after him. Brook also kept weather diaries for half a century, "
    "recording frost, rain and the dates the swallows arrived.",
]


def _samples():
    chunks = tuple(_CHUNKS)
    questions = [
        ("In which town was Imke Solberg born?", "Harrowden"),
        ("What was Tobias Krell's trade?", "clockmaker"),
        ("Which year was Wen Calloway born?", "1913"),
        ("What is Ansel Brook best remembered for?", "a comet that returns every 41 years"),
    ]
    return [Sample(str(i), q, chunks, (a,)) for i, (q, a) in enumerate(questions)]


@pytest.fixture(scope="module")
def engine(smollm2):
    from ragkv.storage import MemoryTier, TieredStore

    torch.set_num_threads(2)
    return Engine(smollm2, TieredStore([MemoryTier()]))


@pytest.fixture(scope="module")
def rows(engine):
    specs = [Spec("full"), Spec("naive"), Spec("cacheblend", 0.15), Spec("cacheblend", 0.5), Spec("focus", 0.15)]
    return [evaluate_sample(engine, s, specs, max_new_tokens=16) for s in _samples()]


def _mean(rows, label, metric="kl_mean"):
    return statistics.fmean(r[label][metric] for r in rows)


def test_full_is_the_reference(rows):
    assert all(r["full"]["kl_mean"] == pytest.approx(0.0, abs=1e-6) for r in rows)
    assert all(r["full"]["top1_agreement"] == 1.0 for r in rows)


def test_recomputing_more_tokens_moves_closer_to_full_prefill(rows):
    naive, cb15, cb50 = _mean(rows, "naive"), _mean(rows, "cacheblend@0.15"), _mean(rows, "cacheblend@0.5")
    assert naive > 0.0
    assert cb50 < cb15 < naive, f"kl_mean naive {naive:.4f}, cacheblend@0.15 {cb15:.4f}, @0.5 {cb50:.4f}"
    assert cb50 <= naive / 3
    assert _mean(rows, "cacheblend@0.15", "top1_agreement") >= 0.8


def test_recomputing_15_percent_cuts_naives_kl(rows):
    # chunk KV computed after the template's prefix already brings naive close (kl 0.195 here, 0.504 when
    # computed after the sink alone), so 15% of recompute cuts a smaller remainder: measured 0.58x
    # (cacheblend) and 0.42x (focus, the default) of naive's kl on these four questions
    naive, blended, focus = _mean(rows, "naive"), _mean(rows, "cacheblend@0.15"), _mean(rows, "focus@0.15")
    print(f"kl_mean naive {naive:.4f} cacheblend@0.15 {blended:.4f} focus@0.15 {focus:.4f}")
    assert blended <= naive * 2 / 3, f"cacheblend@0.15 kl_mean {blended:.4f} vs naive {naive:.4f}"
    assert focus <= naive / 2, f"focus@0.15 kl_mean {focus:.4f} vs naive {naive:.4f}"
    assert _mean(rows, "focus@0.15", "top1_agreement") >= 0.95


def test_second_request_hits_the_chunk_cache(engine):
    sample = _samples()[0]
    first = engine.generate(sample.question, sample.chunks, strategy="cacheblend", namespace="e2e", max_new_tokens=4)
    second = engine.generate(sample.question, sample.chunks, strategy="cacheblend", namespace="e2e", max_new_tokens=4)
    assert first.misses == len(sample.chunks) and sum(first.hits.values()) == 0
    assert second.misses == 0 and second.hits == {"cpu": len(sample.chunks)}
    assert second.text == first.text
    assert second.parts_ms["precompute"] < first.parts_ms["precompute"]
