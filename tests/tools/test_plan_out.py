"""The planner's --out: resolved once at start-up, and a folder that cannot be written fails
before any planning (a full plan compiles for an hour)."""

import os


from deepseek_jax.tools import plan as plan_module


def test_relative_out_is_written_under_the_start_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert plan_module.main(["--model=tiny", "--target=cpu-8", "--batch=8", "--seq=32",
                             "--strategies=dp", "--analytic_only", "--out=rel/plan"]) == 0
    assert sorted(os.listdir(tmp_path / "rel" / "plan")) == ["plan.csv", "plan.md", "plan.png"]
    assert f"wrote {tmp_path}/rel/plan/plan.md" in capsys.readouterr().out


def test_unwritable_out_fails_before_planning(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")

    def must_not_run(*args, **kwargs):
        raise AssertionError("planning started before --out was checked")

    monkeypatch.setattr(plan_module, "plan", must_not_run)
    assert plan_module.main(["--model=tiny", "--target=cpu-8",
                             f"--out={tmp_path}/a_file/plan"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot create" in err and "--out" in err
