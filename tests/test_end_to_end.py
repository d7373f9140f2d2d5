"""End to end on the real SmolLM2-135M-Instruct: self-made multi-chunk questions, blended reuse vs a
full prefill of the same prompt (teacher-forced KL over the full prefill's greedy answer)."""

import statistics

import pytest
import torch

from ragkv.server.engine import Engine
from ragkv.server.eval.datasets import Sample
from ragkv.server.eval.runner import Spec, evaluate_sample

pytestmark = pytest.mark.slow

_PEOPLE = [
    ("Orla Venn", "Marrowgate", "glassblower", "a lighthouse made of green glass", "1871"),
    ("Tobias Krell", "Eastwick Ferry", "clockmaker", "a clock that ran backwards on Sundays", "1902"),
    ("Imke Solberg", "Harrowden", "botanist", "a blue orchid that smells of pepper", "1888"),
    ("Dario Feld", "Little Ashby", "cartographer", "a map of the underground rivers of Lyme", "1856"),
    ("Wen Calloway", "Port Selden", "shipwright", "a three-masted schooner called the Heron", "1913"),
    ("Ansel Brook", "Corrib Hill", "astronomer", "a comet that returns every 41 years", "1897"),
]


def _chunk(name, town, trade, work, year):
    filler = (f"The town of {town} sits in a wide valley with a slow river, a market square and a stone bridge. "
              f"Visitors often mention the bakeries, the bell tower and the quiet lanes behind the church. ")
    return (filler + f"{name} was a {trade} born in {town} in {year}. {name} is best remembered for {work}, "
            f"which is still shown in the museum of {town}. " + filler)


def _samples():
    chunks = tuple(_chunk(*p) for p in _PEOPLE)
    return [
        Sample(str(i), q, chunks, (a,))
        for i, (q, a) in enumerate([
            ("In which town was Imke Solberg born?", "Harrowden"),
            ("What was Tobias Krell's trade?", "clockmaker"),
            ("Which year was Wen Calloway born?", "1913"),
            ("What is Ansel Brook best remembered for?", "a comet that returns every 41 years"),
        ])
    ]


@pytest.fixture(scope="module")
def engine(smollm2):
    from ragkv.storage import MemoryTier, TieredStore

    torch.set_num_threads(2)
    return Engine(smollm2, TieredStore([MemoryTier()]))


def test_cacheblend_kl_is_at_most_a_third_of_naive(engine):
    specs = [Spec("full"), Spec("naive"), Spec("cacheblend", 0.15)]
    rows = [evaluate_sample(engine, s, specs, max_new_tokens=16) for s in _samples()]
    naive = statistics.fmean(r["naive"]["kl_mean"] for r in rows)
    blended = statistics.fmean(r["cacheblend@0.15"]["kl_mean"] for r in rows)
    assert rows[0]["full"]["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert naive > 0.0
    assert blended <= naive / 3, f"cacheblend@0.15 kl_mean {blended:.4f} vs naive {naive:.4f}"
    assert statistics.fmean(r["cacheblend@0.15"]["top1_agreement"] for r in rows) >= 0.9


def test_second_request_hits_the_chunk_cache(engine):
    sample = _samples()[0]
    first = engine.generate(sample.question, sample.chunks, strategy="cacheblend", namespace="e2e", max_new_tokens=4)
    second = engine.generate(sample.question, sample.chunks, strategy="cacheblend", namespace="e2e", max_new_tokens=4)
    assert first.misses == len(sample.chunks) and sum(first.hits.values()) == 0
    assert second.misses == 0 and second.hits == {"cpu": len(sample.chunks)}
    assert second.text == first.text
    assert second.parts_ms["precompute"] < first.parts_ms["precompute"]
