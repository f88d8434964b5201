"""The agent's option objects (``Budget``, ``Reconnect``) and the ``agent`` command's budget: a bad
value is refused when it is given, with a message that names it, not later in the middle of a
call."""

from __future__ import annotations

import pytest

from agents import Budget, Reconnect
from agents.cli import parse_args


@pytest.mark.fast
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("duration_minutes", 0, "duration_minutes=0: give a number above 0"),
        ("tts_characters", -5, "tts_characters=-5: give a number above 0"),
        ("extend_before", -1, "extend_before=-1: give a number 0 or more"),
        ("min_characters", -1, "min_characters=-1: give a number 0 or more"),
        ("top_up_usd", 0, "top_up_usd=0: give a number above 0"),
    ],
)
def test_a_budget_refuses_a_bad_number_by_name(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Budget(**{field: value})


@pytest.mark.fast
def test_a_budget_takes_what_it_is_given() -> None:
    budget = Budget(duration_minutes=0.5, extend_before=0, auto_extend=False, top_up_usd=None)
    assert (budget.duration_minutes, budget.extend_before, budget.auto_extend) == (0.5, 0, False)
    assert budget.tts_characters == 4000 and budget.top_up_usd is None


@pytest.mark.fast
@pytest.mark.parametrize("kwargs", [{"tries": -1}, {"backoff_seconds": -0.1}, {"ping_interval": 0}])
def test_reconnect_refuses_a_bad_setting(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="ping_interval above 0"):
        Reconnect(**kwargs)  # type: ignore[arg-type]


@pytest.mark.fast
def test_the_agent_command_refuses_a_bad_budget_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    required = ["--gateway", "http://127.0.0.1:8402", "--wallet", "w.json", "--room", "r"]
    with pytest.raises(SystemExit) as exit_:
        parse_args([*required, "--minutes", "0"])
    assert exit_.value.code == 2
    assert "duration_minutes=0.0: give a number above 0" in capsys.readouterr().err
    args = parse_args([*required, "--minutes", "2.5", "--top-up-usd", "1"])
    assert args.budget == Budget(duration_minutes=2.5, top_up_usd=1.0)
