"""Plans: the paper's notation round-trips, and plans pick the right solver per block."""

import pytest
import torch
from hypothesis import given, strategies as st

from arflow_solvers import GSJacobi, Jacobi, Newton, Plan, Serial
from arflow_solvers import init as inits
from arflow_solvers.plan import as_plan


def test_paper_examples_parse_to_the_stated_solvers():
    plan = Plan.parse("[6-8-32-10]", num_blocks=8)
    assert plan.solver_for(6) == GSJacobi(8, max_iters=32)
    assert all(plan.solver_for(i) == Jacobi(max_iters=10) for i in range(8) if i != 6)
    plan = Plan.parse("[0/7-16/8-10/13-6]", num_blocks=8)
    assert plan.solver_for(0) == GSJacobi(16, max_iters=10)
    assert plan.solver_for(7) == GSJacobi(8, max_iters=13)
    assert plan.solver_for(3) == Jacobi(max_iters=6)


# The authors' published strategies, in their notation (the model's block order), and the
# per-block lists their sampling code runs them with (sampling order; 0 GS = the serial loop).
PUBLISHED = {
    "[6-8-32-10]": ([1, 8, 1, 1, 1, 1, 1, 1], [10, 32, 10, 10, 10, 10, 10, 10]),
    "[7-8-32-10]": ([8, 1, 1, 1, 1, 1, 1, 1], [32, 10, 10, 10, 10, 10, 10, 10]),
    "[0/6-8-32-20]": ([1, 8, 1, 1, 1, 1, 1, 8], [20, 32, 20, 20, 20, 20, 20, 32]),
    "[0/7-256/8-1/13-6]": ([8, 1, 1, 1, 1, 1, 1, 256], [13, 6, 6, 6, 6, 6, 6, 1]),
}


@pytest.mark.parametrize("text", sorted(PUBLISHED))
def test_paper_numbering_maps_the_published_plans_to_sampling_order(text):
    segments, caps = PUBLISHED[text]
    plan = Plan.parse(text, num_blocks=8, numbering="paper")
    for index in range(8):
        solver = plan.solver_for(index)
        assert getattr(solver, "segments", 1) == segments[index]
        assert solver.max_iters == caps[index]


def test_paper_numbering_needs_the_block_count():
    with pytest.raises(ValueError, match="num_blocks"):
        Plan.parse("[6-8-32-10]", numbering="paper")
    with pytest.raises(ValueError, match="numbering"):
        Plan.parse("[6-8-32-10]", 8, numbering="density")


def test_a_cap_of_star_is_the_exactness_bound():
    plan = Plan.parse("[2-4-*-*]")
    assert plan.solver_for(2).max_iters is None and plan.default.max_iters is None
    assert str(plan) == "[2-4-*-*]"


caps = st.one_of(st.none(), st.integers(1, 99))


@given(st.dictionaries(st.integers(0, 15), st.tuples(st.integers(1, 64), caps), max_size=5), caps)
def test_notation_round_trips(tough, rest):
    plan = Plan(Jacobi(max_iters=rest), {i: GSJacobi(m, max_iters=c) for i, (m, c) in tough.items()})
    text = str(plan)
    assert text.startswith("[")
    assert Plan.parse(text) == plan
    assert str(Plan.parse(text)) == text


@given(st.sampled_from([0.0, 1e-3, 1e-5, 2.5e-7]), st.sampled_from(["", ":z0"]),
       st.sampled_from(["[10]", "[*]", "[0/6-8-32-20]", "[2-4-*-*]"]))
def test_tolerance_and_initial_guess_suffixes_round_trip(tol, init, body):
    plan = Plan.parse(body, tol=tol, init=inits.zeros_first_exact if init else inits.noise)
    assert Plan.parse(str(plan)) == plan
    assert str(plan).endswith(init) and ("@" in str(plan)) == (tol != 1e-5)


def test_plans_the_notation_cannot_carry_print_as_python():
    assert str(Plan(Jacobi(atol=1e-3))) == "Plan(Jacobi(atol=0.001))"


@given(st.text(max_size=20))
def test_parser_accepts_only_the_notation(text):
    try:
        plan = Plan.parse(text)
    except ValueError:
        return
    assert str(plan) == text.strip().replace(" ", "") or Plan.parse(str(plan)) == plan


@pytest.mark.parametrize("bad", ["", "6-8-32-10", "[6-8-32]", "[a-1-2-3]", "[1/2-3/4/5-4-5]",
                                 "[1/1-2/2-3/3-4]", "[3-0-5-5]", "[-1]"])
def test_bad_plan_strings_raise_value_error(bad):
    with pytest.raises(ValueError, match="plan"):
        Plan.parse(bad)


def test_stack_indices_are_checked_against_the_flow():
    with pytest.raises(ValueError, match="block 8 does not exist"):
        Plan.parse("[8-4-10-10]", num_blocks=8)
    with pytest.raises(ValueError, match="overrides blocks"):
        as_plan(Plan(Jacobi(), {5: Serial()}), num_blocks=3)


def test_plans_that_the_notation_cannot_express_print_as_python():
    plan = Plan(Serial(), {1: Jacobi(tol=1e-3)})
    assert str(plan) == "Plan(Serial(), {1: Jacobi(tol=0.001)})"


def test_plans_save_and_load(tmp_path):
    plan = Plan(Jacobi(max_iters=7, tol=1e-4), {0: GSJacobi([3, 5], tol=1e-4), 2: Serial()})
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    every_option = Plan(Jacobi(tol=0.0, drop_converged=True, on_divergence="give_up",
                               update_dtype=torch.float64, patience=3))
    every_option.save(tmp_path / "options.json")
    assert Plan.load(tmp_path / "options.json") == every_option
    assert str(every_option).startswith("Plan(")  # the notation cannot carry these options


def test_a_plan_can_be_one_solver_or_a_string():
    assert as_plan(Serial()) == Plan(Serial())
    assert as_plan("[10]") == Plan(Jacobi(max_iters=10))
    with pytest.raises(TypeError, match="plan must be"):
        as_plan(10)


def test_every_solver_option_survives_save_and_load(tmp_path):
    import dataclasses

    plan = Plan(Serial(update_dtype=torch.float32),
                {1: GSJacobi((2, 3), tol=1e-3, atol=1e-6, norm="rms", max_iters=4, init=inits.zeros,
                             patience=2, update_dtype=torch.float64, drop_converged=False,
                             on_divergence="give_up"),
                 2: Newton(tol=1e-3, atol=1e-6, norm="rms", max_iters=4, init=inits.zeros, patience=2,
                           chunk_size=16)})
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    for solver in (Serial(), Jacobi(), GSJacobi(2), Newton()):  # every field is written: none can be dropped
        written = Plan(solver).to_dict()["default"]
        assert set(written) == {"type"} | {f.name for f in dataclasses.fields(solver)}


@pytest.mark.parametrize("text, message", [
    ('{"default": {"type": "Jacobi", "tol": 1e-3, "max_iter": 5}}', r"unknown Jacobi options \['max_iter'\]"),
    ('{"default": {"type": "Jacobi"}, "overide": {}}', r"unknown keys \['overide'\]"),
    ('{"default": {"type": "Anderson"}}', "unknown solver type 'Anderson'"),
    ('{"default": {"type": "Jacobi", "tol": "fast"}}', "tol must be a finite number"),
    ('{"default": {"type": "Jaco', "cannot read a plan"),
])
def test_a_plan_file_that_is_not_right_is_refused_naming_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        Plan.load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text", ["[10]@1e400", "[10]@inf"])
def test_notation_with_an_impossible_tolerance_is_refused(text):
    with pytest.raises(ValueError):
        Plan.parse(text)
