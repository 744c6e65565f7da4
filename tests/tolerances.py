"""Comparing numbers that come out of model forwards, with tolerances stated in rounding steps.

Two computations of the same quantity by different kernels (vLLM vs transformers, a batch of another
shape, a native bf16 instruction set vs an emulated one, a gloo all-reduce vs one process) round at
different places and in a different order, so they agree only up to the precision of the float format
at the value's magnitude. A tolerance is therefore a number of *rounding steps*, not an absolute number
picked on one machine:

    |a - b| <= k * eps * max(1, |a|, |b|)

with `eps` the format's machine epsilon (float32 2**-23, bfloat16 2**-7: the spacing of numbers in
[1, 2); between 8 and 16 a bf16 step is 2**-4 = 0.0625) and `k` how many steps two kernel paths may
drift apart. The floor of 1 covers log-probs near 0, whose error is set by the logits' magnitude
(O(1) and up), not by the log-prob's own. Exact equality is kept where the computation is bit-identical
by construction (the same call on the same shapes, or a copy).

How each `k` was chosen (measured on this project's CPU machines, AVX512-BF16 and without):
- `BF16_KERNELS` (k=8): vLLM's bf16 engine vs the learner's bf16 autocast forward on the same bf16
  weights differ by up to 3.0 steps at the value (2.4 relative eps; 0.0625 at a log-prob of -8.1 was
  the value that failed an absolute 0.05). An engine that missed the push differs by > 100 eps.
- `FP32_KERNELS` (k=512, 6.1e-5 at |x| <= 1): two fp32 implementations (vLLM vs transformers, engine
  vs learner) were seen within 4.8e-7 (~4 eps); 512 leaves two orders of magnitude for another CPU's
  blocking, and stays > 100x under the smallest real error the tests look for (a wrong position,
  token or missed push moves a log-prob by >= 1e-2).
- `FP32_BATCH` (k=64, 7.6e-6 at |x| <= 1): the same fp32 model in batches of other shapes agreed to a
  few 1e-7 (-3.268855571746826 vs -3.2688543796539307: ~1.4 eps relative).
- Sums of many terms in another order (gradients accumulated over micro-batches or ranks) are compared at
  the scale of the whole tensor (`assert_tensor_close(..., per="tensor")`): a reduction's rounding is
  relative to the size of what it adds up, so an entry that cancels to ~0 keeps an absolute error of that
  size.
- `adam_rounding(lr, steps)`: two learners whose gradients differ only by rounding end up with weights apart by
  a fraction of lr per step where the gradient is ~0 (AdamW divides by sqrt(v), which lifts rounding noise to
  the step size): measured 3.3e-6 after 2 steps at lr 1e-3 (3.3e-5 at 1e-2), so bound 5e-3 x lr x steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from onpolicy.types import TeacherScores

FP32_EPS = 2.0**-23
BF16_EPS = 2.0**-7


@dataclass(frozen=True)
class Rounding:
    """`k` rounding steps of a float format (machine epsilon `eps`) at the magnitude of the values compared."""

    name: str
    eps: float
    k: float

    def at(self, magnitude: float) -> float:
        """The tolerance for values of this magnitude: k * eps * max(1, |magnitude|)."""
        return self.k * self.eps * max(1.0, abs(magnitude))

    def close(self, a: float, b: float) -> bool:
        return abs(a - b) <= self.at(max(abs(a), abs(b)))

    def __str__(self) -> str:
        return f"{self.name}: {self.k:g} x eps {self.eps:.3g} x max(1, |x|)"


BF16_KERNELS = Rounding("bf16, two kernel paths", BF16_EPS, 8)
FP32_KERNELS = Rounding("fp32, two kernel paths", FP32_EPS, 512)
FP32_BATCH = Rounding("fp32, same model, another batch shape", FP32_EPS, 64)
# The compact wire form's top-k log-probs are float16 (eps 2**-10): one rounding is half a step, 2**-11 relative;
# k=1 step leaves the other half for the kernels' drift (FP32_KERNELS: ~1/16 of it at |x| <= 1).
FP16_WIRE = Rounding("fp16 on the wire (compact top-k), plus fp32 kernels", 2.0**-10, 1)
# float64 sums of the same terms in another order or grouping (the chunked loss against the unchunked one):
# measured within ~4 eps; 64 leaves room and stays ~1e10 x under any real float32-sized error.
FP64_ORDER = Rounding("fp64, the same sums in another order", 2.0**-52, 64)


def adam_rounding(lr: float, steps: int) -> float:
    """How far apart rounding leaves the weights of two AdamW learners after `steps` steps at `lr` (see above)."""
    return 5e-3 * lr * steps


def assert_tensor_close(got, ref, tol: Rounding, what: str = "tensor", per: str = "element") -> None:
    """torch tensors within `tol`: at each element's own magnitude (`per="element"`), or at the largest
    magnitude in `ref` (`per="tensor"`, for sums taken in another order)."""
    import torch

    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    a, b = got.detach().double(), ref.detach().double()
    if per == "tensor":
        bound = torch.full_like(b, tol.k * tol.eps * float(b.abs().max()))
    else:
        bound = tol.k * tol.eps * torch.maximum(torch.maximum(a.abs(), b.abs()), torch.ones_like(a))
    excess = (a - b).abs() - bound
    if bool((excess > 0).any()):
        i = int(excess.flatten().argmax())
        raise AssertionError(f"{what}: element {i}: {a.flatten()[i].item()} vs {b.flatten()[i].item()} "
                             f"beyond {bound.flatten()[i].item():.3g} ({tol}, per {per})")


def worst(got: Iterable[float], ref: Iterable[float], tol: Rounding) -> float:
    """The largest |a - b| over the pairs, in units of `tol` (<= 1 means every pair is within it)."""
    pairs = list(zip(got, ref))
    assert pairs, "nothing to compare"
    return max(abs(a - b) / tol.at(max(abs(a), abs(b))) for a, b in pairs)


def assert_close(got: Sequence[float], ref: Sequence[float], tol: Rounding, what: str = "values") -> None:
    """Same length and every pair within `tol` at its own magnitude."""
    assert len(got) == len(ref), f"{what}: {len(got)} vs {len(ref)}"
    for i, (a, b) in enumerate(zip(got, ref)):
        assert tol.close(a, b), f"{what}[{i}]: {a} vs {b}, |diff| {abs(a - b):.3g} > {tol.at(max(abs(a), abs(b))):.3g} ({tol})"


def assert_nested_close(
    got: Sequence[Sequence[float]], ref: Sequence[Sequence[float]], tol: Rounding, what: str = "log-probs"
) -> None:
    """Per-sequence lists (e.g. log-probs of each completion token) of the same lengths, each pair within `tol`."""
    assert len(got) == len(ref), f"{what}: {len(got)} sequences vs {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_close(g, r, tol, f"{what} of sequence {i}")


def assert_scores_close(got: Sequence[TeacherScores], ref: Sequence[TeacherScores], tol: Rounding = FP32_BATCH) -> None:
    """Same number of scores, same lengths, log-probs within `tol`, same top-k ids with values within `tol`."""
    assert len(got) == len(ref), f"{len(got)} scores, expected {len(ref)}"
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_close(g.logprobs, r.logprobs, tol, f"log-probs of sequence {i}")
        assert (g.top_k is None) == (r.top_k is None), f"sequence {i}: top_k present on one side only"
        assert len(g.top_k or []) == len(r.top_k or []), f"sequence {i}: top-k rows"
        for t, (grow, rrow) in enumerate(zip(g.top_k or [], r.top_k or [])):
            assert [tok for tok, _ in grow] == [tok for tok, _ in rrow], f"sequence {i}, position {t}: top-k ids"
            assert_close([v for _, v in grow], [v for _, v in rrow], tol, f"sequence {i}, position {t}: top-k")
