"""The convex identification experiment (examples/identification.py).

Theory (module docstring of identification.py): with a certified-stable optimal support,
RAMDA and RMDA (dual averaging = variance-reduced gradient averages, c ramped to 1 in the
last stage) must find the optimal support and keep it, while ProxSGD (an EMA of stochastic
gradients whose noise does not decay) keeps leaving it. Each assertion below can fail: a
wrong prox, a broken restart/ramp or a wrong optimum breaks the first two; ProxSGD gaining
variance reduction (or the problem being too easy) breaks the third.
"""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import identification

STAGE = 1000  # steps per stage; 3 stages. Last stage: steps [2000, 3000).


@pytest.fixture(scope="module")
def problem_and_optimum():
  problem = identification.make_problem(seed=0)
  opt = identification.solve_optimum(problem)
  return problem, opt


def test_optimum_is_certified(problem_and_optimum):
  problem, opt = problem_and_optimum
  identification.certify(opt)  # residual <= 1e-12, strict margins (see certify)
  # Independent check of the zero groups' optimality condition, recomputed here in float64
  # with numpy: ||grad_g f(x*)|| < lam sqrt(|g|) for every zero group.
  margin = problem.s * (np.einsum("ngs,gs->n", problem.x, opt.w) + opt.b)
  coef = -problem.s / (1 + np.exp(margin))
  grad = np.einsum("n,ngs->gs", coef, problem.x) / len(coef)
  norms = np.linalg.norm(grad, axis=1)[~opt.support]
  assert np.all(norms < problem.lam * np.sqrt(problem.size))
  # Non-zero groups: grad_g + lam sqrt|g| w_g / ||w_g|| = 0 to the solver's accuracy;
  # 1e-10 is far above the 1e-12 residual times the problem's scale (~1).
  w = opt.w[opt.support]
  sub = grad[opt.support] + problem.lam * np.sqrt(problem.size) * w / np.linalg.norm(
      w, axis=1, keepdims=True)
  assert np.max(np.abs(sub)) < 1e-10


def test_certify_rejects_an_unstable_support(problem_and_optimum):
  _, opt = problem_and_optimum
  with pytest.raises(ValueError, match="zero group"):
    identification.certify(opt._replace(max_zero_ratio=0.999))
  with pytest.raises(ValueError, match="residual"):
    identification.certify(opt._replace(residual=1e-6))


@pytest.mark.parametrize("name", ["ramda", "rmda"])
def test_dual_averaging_identifies_and_keeps_support(problem_and_optimum, name):
  problem, opt = problem_and_optimum
  trace = identification.train(name, problem, opt, stage=STAGE, seed=0)
  summary = identification.summarize(trace)
  # Identified inside the last stage (after the ramp makes x = z) and kept to the end:
  # every step of the second half of the last stage has exactly the optimal support.
  assert summary["identified_at"] is not None
  assert 2 * STAGE < summary["identified_at"] <= 2 * STAGE + STAGE // 2
  assert trace.match[2 * STAGE + STAGE // 2:].all()


def test_proxsgd_does_not_keep_support(problem_and_optimum):
  problem, opt = problem_and_optimum
  trace = identification.train("proxsgd", problem, opt, stage=STAGE, seed=0)
  # Same window as above: ProxSGD leaves the optimal support in it (it did so in well
  # over half of these 500 steps when this test was written).
  assert not trace.match[2 * STAGE + STAGE // 2:].all()
