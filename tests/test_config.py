import io

import pytest

from lepton_magic.config import Config, parse_duration


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200), ("1.5", 1.5),
                                           ("250ms", 0.25), (" 3 m ", 180), ("none", None), (None, None)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-1s", "0", "10x", "1h30m"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="expected a duration like 90s, 30m or 2h"):
        parse_duration(text)


def test_file_then_environment_then_session(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text('nodes = 3\nidle_timeout = "5m"\ntimeout = "1h"\n')
    monkeypatch.setenv("LEPTON_CONFIG", str(path))
    monkeypatch.setenv("LEPTON_TIMEOUT", "90s")
    config = Config.load()
    assert config["nodes"] == 3 and config.sources["nodes"] == str(path)
    assert config["idle_timeout"] == 300
    assert config["timeout"] == 90 and config.sources["timeout"] == "LEPTON_TIMEOUT"
    config.set("nodes", "4")
    assert config["nodes"] == 4 and config.sources["nodes"] == "%lepton config"
    assert config["backend"] == "local" and config.sources["backend"] == "default"


def test_bad_config_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text("nodes = = 3\n")
    monkeypatch.setenv("LEPTON_CONFIG", str(path))
    with pytest.raises(ValueError, match="is not valid TOML"):
        Config.load()
    path.write_text("colour = 'blue'\n")
    with pytest.raises(ValueError, match="unknown setting 'colour'; accepted: backend, nodes"):
        Config.load()


def test_every_backend_is_accepted_and_a_bad_host_says_so():
    config = Config.load()
    config.set("backend", "ray")  # the ray backend is here now (its package is the ray extra)
    assert config["backend"] == "ray"
    with pytest.raises(ValueError, match="an SSH host looks like user@host:port"):
        config.set("ssh_hosts", "root@box:port")


def test_terminal_progress_redraws_one_line(ip):
    import lepton_magic as lm
    from lepton_magic.ui import progress as progress_module
    from lepton_magic.ui.progress import TextProgress

    run = lm.current_session().submit("import time\nfor i in range(15):\n    lepton.log(step=i, loss=1 / (i + 1))\n"
                              "    time.sleep(0.1)\nprint('done')\n", {}, nodes=1)
    out = io.StringIO()
    progress = TextProgress(run, out=out, terminal=True)
    progress_module.QUIET_SECONDS = 0.2
    try:
        while not run._live.wait(0.05):
            progress.tick()
    finally:
        progress_module.QUIET_SECONDS = 1.0
    progress.finish()
    text = out.getvalue()
    assert "\r\x1b[K⏳ " + run.name in text and "step " in text and "loss " in text
    assert text.rstrip().splitlines()[-1].startswith(f"✓ {run.name} succeeded")
    assert "done" in text
