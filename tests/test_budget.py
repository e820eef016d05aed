"`--budget`: the epochs planned from the measured speed, the run stopped by the plan, the plan kept on --resume; the one-line errors."
import json
import re
import signal

from helpers import on_checkpoint, run_main
from self_supervised_swav.budget import BudgetPlan, parse_duration, plan_epochs
from self_supervised_swav.checkpoint import Interrupted
from self_supervised_swav.cli import main

RUN = ["--max_images", "300", "--size", "16", "--crop_sizes", "16", "8", "--n_protos", "20", "--bs", "32"]   # a few seconds an epoch


def budget_run(out, budget: str = "2m", *more) -> tuple[int, str, str]:
    "(exit status, stderr, budget) of a budget run; on a machine too busy for `budget`, once more with the smallest budget the refusal names"
    code, err = run_main(main, *RUN, "--budget", budget, "--output", out, *more)
    smallest = re.search(r"pass --budget (\S+) or more", err)
    if code == 2 and smallest:   # the refusal names a budget that works: it must plan at least one epoch
        budget = smallest.group(1)
        code, err = run_main(main, *RUN, "--budget", budget, "--output", out, "--overwrite", *more)
    return code, err, budget


def test_budget_plans_the_epochs_from_the_measured_speed(tmp_path):
    out = tmp_path / "out"
    code, err, budget = budget_run(out)
    assert code == 0, err
    res = json.loads((out / "swav_pretrain.json").read_text())
    plan = res["settings"]["budget_plan"]
    replanned = plan_epochs(BudgetPlan(**{**plan, "epochs": 0}))
    assert plan["epochs"] == replanned.epochs >= 1 and res["settings"]["epochs"] == plan["epochs"]   # the epochs follow from the rate
    assert [e["epoch"] for e in res["epochs"]] == list(range(plan["epochs"]))                      # and the run trained them all
    assert replanned.expected_s <= parse_duration(budget) and plan["iters"] == 240 // 32
    assert f"planned for --budget {budget}" in res["settings"]["auto"]["epochs"]
    assert res["seconds"] < 2 * parse_duration(budget)   # loose on a shared machine: a planner ignoring the budget runs 8 epochs


def test_resume_keeps_the_plan(tmp_path):
    out = tmp_path / "out"
    with on_checkpoint(0, Interrupted(signal.SIGTERM)): code, _, budget = budget_run(out)
    assert code == 128 + signal.SIGTERM
    planned = json.loads((out / "settings.json").read_text())
    code, err = run_main(main, "--resume", out, "--budget", "99m")   # another budget is another run
    assert code == 2 and "--resume" in err and f"--budget {budget}" in err
    code, err = run_main(main, "--resume", out)
    assert code == 0, err
    res = json.loads((out / "swav_pretrain.json").read_text())
    assert res["settings"]["epochs"] == planned["epochs"] and res["settings"]["budget_plan"] == planned["budget_plan"]
    assert len(res["epochs"]) == planned["epochs"]


def test_budget_errors_are_one_line(tmp_path):
    code, err = run_main(main, "--budget", "20minutes", "--output", tmp_path / "a")
    assert code == 2 and err == "swav_pretrain: error: --budget must be a duration such as 90s, 20m or 1.5h, got '20minutes'\n"
    code, err = run_main(main, *RUN, "--budget", "1s", "--output", tmp_path / "b")
    assert code == 2 and err.count("\n") == 1 and "error: --budget 1s is too short for one epoch here" in err and "pass --budget " in err
    code, err = run_main(main, "--budget", "5m", "--epochs", "3", "--output", tmp_path / "c")
    assert code == 2 and "drop --epochs 3" in err
