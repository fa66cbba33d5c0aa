"""Settings from arguments and LOGITWATCH_* variables, failing fast with the setting's name."""

from __future__ import annotations

import pytest

from logitwatch.service.settings import default_db_path, load_settings


def test_defaults_and_documented_sqlite_location(monkeypatch, tmp_path):
    monkeypatch.setenv("LOGITWATCH_HOME", str(tmp_path))
    s = load_settings()
    assert (
        s.db_url == f"sqlite:///{tmp_path}/logitwatch.db" and default_db_path().parent == tmp_path
    )
    assert (s.host, s.port, s.workers, s.auth) == ("127.0.0.1", 8000, 1, False)
    assert s.body_limit_bytes == 32 * 1024 * 1024 and s.max_series_per_run == 100_000
    monkeypatch.delenv("LOGITWATCH_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "logitwatch" / "logitwatch.db"


def test_environment_and_lists(monkeypatch):
    monkeypatch.setenv("LOGITWATCH_PORT", "9123")
    monkeypatch.setenv("LOGITWATCH_WEBHOOK_URLS", "http://a/x, http://b/y")
    monkeypatch.setenv("LOGITWATCH_CORS_ORIGINS", '["http://localhost:3000"]')
    monkeypatch.setenv("LOGITWATCH_DB_URL", "postgresql://u@h/db")
    s = load_settings()
    assert s.port == 9123 and s.webhook_urls == ["http://a/x", "http://b/y"]
    assert s.cors_origins == ["http://localhost:3000"]
    assert s.db_url == "postgresql+psycopg://u@h/db"
    assert load_settings(port=1).port == 1  # arguments win over the environment
    monkeypatch.setenv("LOGITWATCH_ALERTMANAGER_URL", "http://am:9093/")
    monkeypatch.setenv("LOGITWATCH_ALERTMANAGER_RESEND_S", "15")
    s = load_settings()
    assert (s.alertmanager_url, s.alertmanager_resend_s) == ("http://am:9093", 15.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"port": 70000}, "setting port (LOGITWATCH_PORT)"),
        ({"db_url": "mysql://x/y"}, "setting db_url (LOGITWATCH_DB_URL): 'mysql'"),
        ({"db_url": "not a url"}, "is not a database URL"),
        ({"workers": 0}, "setting workers"),
        ({"rules_file": "/no/such/file.yaml"}, "does not exist"),
        ({"body_limit_bytes": 10}, "setting body_limit_bytes"),
        (
            {"alertmanager_url": "ftp://am:9093"},
            "setting alertmanager_url (LOGITWATCH_ALERTMANAGER_URL)",
        ),
        ({"alertmanager_url": "am:9093"}, "is not an http(s) URL"),
        ({"alertmanager_resend_s": 0}, "setting alertmanager_resend_s"),
    ],
)
def test_bad_values_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(**kwargs)
