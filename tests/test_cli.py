"""The `esper-fn` command starts without importing torch; the package's public names load lazily."""

import subprocess
import sys

import esper_fn as ef

PUBLIC = [
    "CURVES", "INCUBATION", "TRANSITIONS", "BlueprintError", "CapabilityError", "CheckpointError", "ConfigError",
    "EsperError", "GateConfig", "GateError", "GraftError", "GrownNetwork", "Host", "HostError",
    "IllegalTransitionError", "Op", "SlotSpec", "Stage", "State", "TaskError", "advance", "alpha_at", "apply",
    "blueprints", "export", "fossilize", "germinate", "hosts", "init", "legal_actions", "legal_ops", "optim",
    "prune", "stack", "tick", "train_step", "unstack", "wrap",
]  # fmt: skip


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_cli_help_does_not_import_torch():
    r = _python(
        "import sys\n"
        "from esper_fn.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "usage: esper-fn" in r.stdout and r.stdout.strip().endswith("False")
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "esper_fn.cli" in imported and not any(m.split(".")[0] == "torch" for m in imported)


def test_grow_help_lists_flags_without_torch():
    r = _python("import sys\nfrom esper_fn.cli import main\n"
                "try:\n    main(['grow', '--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    assert r.returncode == 0 and "--task" in r.stdout and "--param-budget" in r.stdout
    assert r.stdout.strip().endswith("False")


def test_public_names_are_kept_and_load_on_use():
    assert set(PUBLIC) <= set(ef.__all__)  # the names of the eager __init__ (new ones may be added)
    for name in ef.__all__:
        assert getattr(ef, name) is not None
    assert set(ef.__all__) <= set(dir(ef))
    assert ef.Stage.BLENDING.name == "BLENDING" and callable(ef.germinate)
    assert ef.hosts.mlp is not None and ef.report.timeline is not None and ef.checkpoint.CheckpointManager


def test_a_from_import_registers_the_catalogue_first():
    r = subprocess.run([sys.executable, "-c",
                        "from esper_fn import germinate, hosts, init\n"
                        "s = germinate(init(hosts.mlp((40, 16, 10))), 'input', 'conv1d_k5')\n"
                        "print(s.num_params())"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1003"


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'germinat'"):
        ef.germinat  # noqa: B018


def test_grow_on_digits_and_a_typed_error_for_a_host_that_cannot_take_the_task(tmp_path, capsys):
    from esper_fn.cli import main

    rc = main(["grow", "--task", "digits", "--host", "mlp-impaired", "--controller", "static", "--epochs", "1",
               "--out", str(tmp_path / "digits"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "1210 -> 1210" in out  # 64-16-10: the preset sized for 8x8 digits
    rc = main(["grow", "--task", "mnist1d-seq", "--host", "mlp-impaired", "--epochs", "1",
               "--out", str(tmp_path / "seq"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "mlp-impaired" in err and "(40, 1)" in err and "(40,)" in err and "Traceback" not in err


def test_grow_reports_a_blocked_growth(tmp_path, capsys):
    from esper_fn.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("plateau: {patience: 1, min_delta: 1.0, grow_until: 1.0}\n")
    rc = main(["grow", "--config", str(cfg), "--epochs", "3", "--param-budget", "900", "--out", str(tmp_path / "b"),
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "growth blocked (epoch 2)" in out and "budget of 900" in out
