"""Secrets in config are found by the words of their keys, in URLs and in argument lists:
``infercore config show`` redacts them and ``infercore deploy k8s`` refuses them as literals
(they would end up in a ConfigMap). Keys that are not secrets stay visible."""

from __future__ import annotations

import pytest

from infercore.config.compose import _secret_key, redact, secret_paths
from infercore.deploy.recipe import check_secret_literals


@pytest.mark.parametrize(
    "key",
    [
        # Words that name a secret wherever they stand (as before).
        "token",
        "access_token",
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "client_secret",
        "password",
        "db_password",
        "passwd",
        "apiKey",
        "credentials",
        "Authorization",
        "Proxy-Authorization",
        "Cookie",
        "X-Amz-Security-Token",
        "X-Amz-Credential",
        "sessionId",
        # Words that name a secret as the key's last word.
        "DB_PASS",
        "pass",
        "db_pwd",
        "key",
        "api_key",
        "x-api-key",
        "X-Api-Key",
        "private_key",
        "Private-Key",
        "X-Signing-Key",
        "signing-key",
        "signingKey",
        "sig",
        "signature",
        "X-Amz-Signature",
        "X-Hub-Signature-256",
        "auth",
        "X-Auth",
        "basic_auth",
        "session",
        "X-Session",
    ],
)
def test_secret_keys(key: str) -> None:
    assert _secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "Content-Type",
        "Accept",
        "User-Agent",
        "X-Request-Id",
        "key_field",
        "key_header",
        "monkey",
        "keys",
        "max_keys",
        "join_key",
        "public_key",
        "partition_key",
        "auth_env",
        "auth_file",
        "pass_env",
        "bypass",
        "first_pass",
        "max_tokens",
        "tokenizer",
        "token_url",
        "token_file",
        "password_file",
        "secret_name",
        "api_key_header",
        "signature_version",
        "session_ttl",
        "signal",
        "redis_url",
        "description",
    ],
)
def test_keys_that_are_not_secrets(key: str) -> None:
    assert not _secret_key(key)


#: The actions of the QA report's recipe (section 3): five secrets, none named by the old words.
ACTIONS = [
    {
        "kind": "webhook",
        "url": "https://hooks.example.com/services/T0/B0/x?access_token=S3cretQueryTok&team=ml",
        "allow_hosts": ["hooks.example.com"],
        "headers": {
            "X-Signing-Key": "S3cretSigningKey",
            "Private-Key": "S3cretPrivKey",
            "Content-Type": "application/json",
        },
    },
    {
        "kind": "command",
        "argv": ["/bin/true", "--password=S3cretArgv", "--token", "S3cretTok", "--epochs", "3"],
        "env": {"DB_PASS": "S3cretDbPass", "MODE": "fast"},
        "pass_env": ["HOME", "DB_HOST"],
    },
]


def test_redact_masks_query_parameters_headers_options_and_env() -> None:
    out = redact({"actions": ACTIONS})
    webhook, command = out["actions"]
    assert webhook["url"] == ("https://hooks.example.com/services/T0/B0/x?access_token=***&team=ml")
    assert webhook["headers"] == {
        "X-Signing-Key": "***",
        "Private-Key": "***",
        "Content-Type": "application/json",
    }
    assert command["argv"] == ["/bin/true", "--password=***", "--token", "***", "--epochs", "3"]
    assert command["env"] == {"DB_PASS": "***", "MODE": "fast"}
    assert command["pass_env"] == ["HOME", "DB_HOST"]
    assert "S3cret" not in repr(out)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://h/x?token=abc", "https://h/x?token=***"),
        ("https://h/x?a=1&sig=abc%3D&b=2", "https://h/x?a=1&sig=***&b=2"),
        ("https://h/x?key=AIza123", "https://h/x?key=***"),
        ("https://h/x?api_key=k&password=p", "https://h/x?api_key=***&password=***"),
        ("https://h/cb#access_token=abc&state=s", "https://h/cb#access_token=***&state=s"),
        ("https://s3/b/o?X-Amz-Signature=abc", "https://s3/b/o?X-Amz-Signature=***"),
        ("https://h/x?monkey=1&keys=a&key_field=id", "https://h/x?monkey=1&keys=a&key_field=id"),
        ("https://h/x?token=", "https://h/x?token="),
        ("redis://user:pw@host:6379/0", "redis://***@host:6379/0"),
        ("see https://h/x?token=abc and more", "see https://h/x?token=*** and more"),
        ("no url ?token=abc", "no url ?token=abc"),
    ],
)
def test_redact_masks_secret_url_parameters(url: str, shown: str) -> None:
    assert redact({"url": url}) == {"url": shown}


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["x", "--api-key=k"], ["x", "--api-key=***"]),
        (["x", "--secret", "s", "--verbose"], ["x", "--secret", "***", "--verbose"]),
        (["x", "db.password=p", "lr=0.1"], ["x", "db.password=***", "lr=0.1"]),
        (
            ["x", "--token-file=/run/t", "--key-field=id"],
            ["x", "--token-file=/run/t", "--key-field=id"],
        ),
        # A switch takes no value: what follows it is an ordinary argument.
        (["x", "--no-password", "data.csv"], ["x", "--no-password", "data.csv"]),
        (["x", "--token", "--verbose"], ["x", "--token", "--verbose"]),
        (["x", "--token"], ["x", "--token"]),
    ],
)
def test_redact_masks_secret_options_in_argument_lists(argv: list[str], shown: list[str]) -> None:
    assert redact({"argv": argv}) == {"argv": shown}


def test_a_switch_is_no_secret() -> None:
    data = {"auth": True, "session": False, "token": None, "password": ""}
    assert redact(data) == data


def test_the_literal_check_names_every_path_of_a_written_secret() -> None:
    data = {"models": {"m": {"drift": {"actions": ACTIONS}}}}
    base = "models.m.drift.actions"
    assert check_secret_literals(data) == [
        f"{base}[0].url",
        f"{base}[0].headers.X-Signing-Key",
        f"{base}[0].headers.Private-Key",
        f"{base}[1].argv[1]",
        f"{base}[1].argv[3]",
        f"{base}[1].env.DB_PASS",
    ]


def test_values_read_from_the_environment_are_not_literals() -> None:
    data = {
        "url": "https://hooks.example.com/x?access_token=${oc.env:HOOK_TOKEN}&team=ml",
        "headers": {
            "X-Signing-Key": "${oc.env:SIGNING_KEY}",
            "Authorization": "Bearer ${oc.env:T}",
        },
        "argv": ["/bin/true", "--password=${oc.env:DB_PASS}", "--token", "${oc.env:TOK}"],
        "env": {"DB_PASS": "${oc.env:DB_PASS}"},
        "redis_url": "${oc.env:INFERCORE_REDIS_URL,redis://127.0.0.1:6379}",
        "store": "redis://:${oc.env:REDIS_PW}@redis:6379/0",
    }
    assert check_secret_literals(data) == []
    assert secret_paths(data) == []


def test_a_secret_in_an_interpolation_default_is_a_literal() -> None:
    # The default is written into the ConfigMap as it is.
    data = {"redis_url": "${oc.env:INFERCORE_REDIS_URL,redis://:hunter2@redis:6379}"}
    assert check_secret_literals(data) == ["redis_url"]
