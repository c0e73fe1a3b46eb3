"""Secrets in config are found by the words of their keys, in URLs (credentials, query and
path) and in argument lists, and by the prefixes of well-known tokens: ``infercore config
show`` redacts them and ``infercore deploy k8s`` refuses them as literals (they would end up in
a ConfigMap). Keys, names, paths and digests that are not secrets stay visible."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infercore.cli import run
from infercore.components import ComponentContext
from infercore.config.compose import compose, redact, secret_paths, secret_url_paths
from infercore.deploy import k8s
from infercore.deploy.recipe import check_secret_literals, compose_unresolved
from infercore.errors import ConfigError
from infercore.plugin_manager import make_plugin_manager
from infercore.redaction import _secret_key, redact_text
from infercore.registry import Registry

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
ENVS = sorted(p.stem for p in (REPO / "conf" / "env").glob("*.yaml"))
DEPLOYS = sorted(p.stem for p in (REPO / "conf" / "deploy").glob("*.yaml"))


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
        # A secret word written into one word, as environment variables are.
        "PGPASSWORD",
        "pgpassword",
        "MYSQLPASSWD",
        "GITHUBTOKEN",
        "clientsecret",
        "myapikey",
        "GCPCREDENTIALS",
        "password2",
        "SECRETKEY",
        "secretaccesskey",
        "MY_API_TOKEN",
        "REDIS_PASSWORD",
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
        "secretKeyRef",  # Kubernetes: {name, key} of a Secret, no value
        "password_ref",
        "api_key_header",
        "signature_version",
        "session_ttl",
        "signal",
        "redis_url",
        "description",
        # A secret word that only starts a word; a secret's pointer, size or kind.
        "tokens",
        "max_new_tokens",
        "tokenizer_config",
        "secretary",
        "passwords",
        "passwordless",
        "PGPASSFILE",
        "token_count",
        "token_limit",
        "password_length",
        "token_ttl",
        "token_type",
        "secret_version",
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
        # Outside a URL too: a secret's name with its value (test_redact_text_masks_*).
        ("no url ?token=abc", "no url ?token=***"),
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
        # An environment variable set on the command line.
        (["env", "PGPASSWORD=hunter2", "psql"], ["env", "PGPASSWORD=***", "psql"]),
        (["x", "--max-tokens=16", "token_count=5"], ["x", "--max-tokens=16", "token_count=5"]),
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


# --- secrets in a URL's path and tokens named by their prefix ---

SLACK = "https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        # Known webhooks: their secret segment, wherever the host puts it; the IDs stay.
        (SLACK, "https://hooks.slack.com/services/T0000/B0000/***"),
        (
            "https://hooks.slack.com/workflows/T01/A02/4567/Zx9Yw8Vu",
            "https://hooks.slack.com/workflows/T01/A02/4567/***",
        ),
        (
            "https://discord.com/api/webhooks/123456789012345678/abcDEF_gh-IJ.kl",
            "https://discord.com/api/webhooks/123456789012345678/***",
        ),
        (
            "https://discordapp.com/api/v10/webhooks/1234/Tok3n/slack",
            "https://discordapp.com/api/v10/webhooks/1234/***/slack",
        ),
        (
            "https://acme.webhook.office.com/webhookb2/1111-22@3333-44/IncomingWebhook/"
            "0123456789abcdef0123456789abcdef/aaaa-bbbb/V2kEy",
            "https://acme.webhook.office.com/webhookb2/1111-22@3333-44/IncomingWebhook/***/***/***",
        ),
        (
            "https://api.telegram.org/bot123456:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage",
            "https://api.telegram.org/***/sendMessage",
        ),
        # Google Chat and Teams workflows (Power Automate) carry theirs in the query.
        (
            "https://chat.googleapis.com/v1/spaces/AAAAb1c/messages?key=k3y&token=t0k",
            "https://chat.googleapis.com/v1/spaces/AAAAb1c/messages?key=***&token=***",
        ),
        (
            "https://prod-12.westeurope.logic.azure.com:443/workflows/"
            "0123456789abcdef0123456789abcdef/triggers/manual/paths/invoke"
            "?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=S1gNaTuRe",
            "https://prod-12.westeurope.logic.azure.com:443/workflows/"
            "0123456789abcdef0123456789abcdef/triggers/manual/paths/invoke"
            "?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=***",
        ),
        # Any host: a segment that looks random (hex, base62, Mattermost's lowercase ids).
        (
            "https://example.com/hook/3f9a0c7d2b1e4f6a8c9d0e1f2a3b4c5d?team=ml",
            "https://example.com/hook/***?team=ml",
        ),
        (
            "https://mm.example.com/hooks/xi5sa8ifm3gjfrakxu6t8hu7ah",
            "https://mm.example.com/hooks/***",
        ),
        (
            "http://alerts.internal:8080/in/Zk3_vQ9xLmP2rT8wYb4nH6jD/drift",
            "http://alerts.internal:8080/in/***/drift",
        ),
        # In text, and as an interpolation's default (written into the ConfigMap as it is).
        (
            f"curl -X POST {SLACK}.",
            "curl -X POST https://hooks.slack.com/services/T0000/B0000/***.",
        ),
        (
            f"${{oc.env:HOOK_URL,{SLACK}}}",
            "${oc.env:HOOK_URL,https://hooks.slack.com/services/T0000/B0000/***}",
        ),
        # Tokens that their prefix names, in a URL or not; the prefix stays.
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789 here", "token ghp_*** here"),
        ("github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyz0123456789AB", "github_pat_***"),
        ("xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "xoxb-***"),
        ("Bearer sk-proj-abcDEF1234567890abcdefghij", "Bearer sk-***"),
        ("--api=sk-ant-api03-AbCdEf0123456789XyZ", "--api=sk-***"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_***"),
        ("glpat-AbCdEf0123456789xYzW", "glpat-***"),
        ("hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "hf_***"),
        ("aws AKIAIOSFODNN7EXAMPLE,", "aws AKIA***,"),
        ("https://h/x?q=AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI", "https://h/x?q=AIza***"),
        ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N", "eyJ***"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAK\n-----END RSA PRIVATE KEY-----",
            "-----BEGIN RSA PRIVATE KEY-----***-----END RSA PRIVATE KEY-----",
        ),
    ],
)
def test_redact_masks_secrets_in_url_paths_and_prefixed_tokens(value: str, shown: str) -> None:
    assert redact({"value": value}) == {"value": shown}
    assert secret_paths({"value": value}) == ["value"]


@pytest.mark.parametrize(
    "value",
    [
        # Model artifacts, names and versions: words, separators, file names.
        "https://models.example.com/fraud/1/model.onnx",
        "https://huggingface.co/distilbert/distilbert-base-uncased-finetuned-sst-2-english/"
        "resolve/main/model.onnx",
        "https://example.com/models/fraud-detector-v2.3.1/onnx/model_quantized_int8.onnx",
        "http://127.0.0.1:9000/drift",
        "https://ml-alerts.internal/api/v1/dags/retrain_fraud_model_2024_01/dagRuns",
        # Digests with their algorithm, and a UUID (a resource's id).
        "https://registry.example.com/v2/acme/model/blobs/"
        "sha256:a68d6411f907308fa10f1ca217b1fd53bec939c25b3fb02f2faec90f5be92af4",
        "https://example.com/runs/123e4567-e89b-12d3-a456-426614174000/model",
        # Object stores name things in their paths (an MLflow run id).
        "s3://mlflow/0/0123456789abcdef0123456789abcdef/artifacts/model.onnx",
        # Known hosts: the IDs alone, not a secret.
        "https://hooks.slack.com/services/T0000/B0000",
        "https://discord.com/api/webhooks",
        # Not URLs: a digest, an image tag, a path.
        "a68d6411f907308fa10f1ca217b1fd53bec939c25b3fb02f2faec90f5be92af4",
        "ghcr.io/acme/infercore:1.0",
        "fraud/artifacts/v1/model.onnx",
        # Words after a token's prefix, or a prefix inside a word.
        "sk-learn-compatible-model-format",
        "xoxb-your-token-here",
        "task-0123456789abcdefghijklmnop",
        "ghp_short",
        "AKIAEXAMPLE",
        "hf_transformers_model_cache_directory",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----",
    ],
)
def test_redact_leaves_urls_names_and_digests_that_are_no_secrets(value: str) -> None:
    assert redact({"value": value}) == {"value": value}
    assert secret_paths({"value": value}) == []


# --- URLs without a scheme, random query values, credentials with every scheme ---

RANDOM = "8f3kQ9vLmP2rT8wYb4nH6jDa"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        # A URL without its scheme is still a URL: its path, credentials and query.
        (
            "hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "hooks.slack.com/services/T0000/B0000/***",
        ),
        (
            "discord.com/api/webhooks/123456789012345678/abcDEF_gh-IJ.kl",
            "discord.com/api/webhooks/123456789012345678/***",
        ),
        (f"example.com/hook/{RANDOM}?team=ml", "example.com/hook/***?team=ml"),
        (f"localhost:9000/in/{RANDOM}", "localhost:9000/in/***"),
        ("user:pass@redis.internal:6379/0", "***@redis.internal:6379/0"),
        (":hunter2@redis.internal:6379", "***@redis.internal:6379"),
        ("admin:hunter2@10.0.0.5/app", "***@10.0.0.5/app"),
        ("redis.internal:6379?password=hunter2", "redis.internal:6379?password=***"),
        ("redis:6379/0?password=hunter2&db=1", "redis:6379/0?password=***&db=1"),
        # In text: after `=`, in quotes, as an interpolation's default, before punctuation.
        ("REDIS=user:pass@redis.internal:6379/0", "REDIS=***@redis.internal:6379/0"),
        (
            "connect to 'user:pass@redis.internal:6379': refused",
            "connect to '***@redis.internal:6379': refused",
        ),
        (
            "${oc.env:HOOK,hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX}",
            "${oc.env:HOOK,hooks.slack.com/services/T0000/B0000/***}",
        ),
        (
            f"post to example.com/hook/{RANDOM}.",
            "post to example.com/hook/***.",
        ),
        # A random-looking query value is masked whatever its parameter's name, with any
        # scheme or none; a bare random query too.
        (f"https://x.example/hook?x={RANDOM}", "https://x.example/hook?x=***"),
        (f"https://x.example/hook?team=ml&c={RANDOM}", "https://x.example/hook?team=ml&c=***"),
        (f"https://x.example/hook?c={RANDOM}%3D%3D&v=2", "https://x.example/hook?c=***&v=2"),
        (
            "https://x.example/hook?c=Zk3vQ9xLmP2rT8wYb4nH6jDa+Lm/Q==",
            "https://x.example/hook?c=***",
        ),
        (f"https://x.example/hook?{RANDOM}", "https://x.example/hook?***"),
        (f"https://x.example/cb#state={RANDOM}", "https://x.example/cb#state=***"),
        (f"redis://redis.internal:6379/0?x={RANDOM}", "redis://redis.internal:6379/0?x=***"),
        (f"x.example/hook?x={RANDOM}", "x.example/hook?x=***"),
        # Credentials with every scheme, a raw '/' in the password included.
        ("redis://:pa/ss@redis.internal:6379/0", "redis://***@redis.internal:6379/0"),
        ("postgresql://user:p/w@db.internal/app", "postgresql://***@db.internal/app"),
    ],
)
def test_redact_masks_urls_without_a_scheme_and_random_query_values(value: str, shown: str) -> None:
    assert redact({"value": value}) == {"value": shown}
    assert secret_paths({"value": value}) == ["value"]


@pytest.mark.parametrize(
    "value",
    [
        # Hosts and ports, names, paths, versions, digests and UUIDs stay as they are.
        "redis.internal:6379",
        "redis:6379/0",
        "127.0.0.1:9000/drift",
        "hooks.slack.com/services/T0000/B0000",
        "huggingface.co/distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        "ghcr.io/acme/infercore:1.0@sha256:"
        "a68d6411f907308fa10f1ca217b1fd53bec939c25b3fb02f2faec90f5be92af4",
        "infercore:1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "example.com/runs/123e4567-e89b-12d3-a456-426614174000/model",
        "models.example.com/fraud/1/model.onnx",
        "package.module:Class",
        "model.py:42: in load",
        "at 12:30 the model fraud-detector-v2.3.1 was promoted",
        "alerts@example.com",
        "mailto:alerts@example.com",
        "git@github.com:acme/models.git",
        "e.g. server.port=9000",
        # Query values that name things.
        "https://h/x?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0",
        "https://h/x?model=distilbert-base-uncased-finetuned-sst-2-english&v=2",
        "https://h/x?run=123e4567-e89b-12d3-a456-426614174000",
        "https://h/x?sha256=a68d6411f907308fa10f1ca217b1fd53bec939c25b3fb02f2faec90f5be92af4",
        "https://h/x?digest=sha256:a68d6411f907308fa10f1ca217b1fd53bec939c25b3fb02f2faec90f5be92af4",
        "https://h/docs#section-configuration-reference",
        # A port, not a password.
        "https://h:8080/a/b@c.com",
        "https://medium.com/@user/post",
    ],
)
def test_redact_leaves_hosts_ports_and_query_names_alone(value: str) -> None:
    assert redact({"value": value}) == {"value": value}
    assert secret_paths({"value": value}) == []


def test_a_url_without_a_scheme_read_from_the_environment_is_no_literal() -> None:
    data = {
        "store": "user:${oc.env:REDIS_PW}@redis.internal:6379/0",
        "query": "redis.internal:6379?password=${oc.env:REDIS_PW}",
        "hook": "hooks.slack.com/services/T0000/B0000/${oc.env:SLACK_HOOK_TOKEN}",
    }
    assert secret_paths(data) == []
    assert secret_url_paths(data) == []


def test_the_literal_check_names_a_webhook_url_without_a_scheme_as_a_url() -> None:
    hook = "hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXXXXXXXXXX"
    data = {"description": f"posts to {hook}", "redis": ":pw@redis.internal:6379"}
    assert check_secret_literals(data) == ["description", "redis"]
    assert secret_url_paths(data) == ["description"]


def test_a_secret_in_a_url_path_read_from_the_environment_is_no_literal() -> None:
    data = {
        "url": "https://hooks.slack.com/services/T0000/B0000/${oc.env:SLACK_HOOK_TOKEN}",
        "whole": "${oc.env:SLACK_HOOK_URL}",
    }
    assert secret_paths(data) == []
    assert secret_url_paths(data) == []


def test_the_literal_check_names_webhook_urls_as_urls() -> None:
    data = {"actions": [{"kind": "webhook", "url": SLACK, "headers": {"X-Api-Key": "k"}}]}
    assert check_secret_literals(data) == ["actions[0].url", "actions[0].headers.X-Api-Key"]
    assert secret_url_paths(data) == ["actions[0].url"]


SECRET = "Zk3vQ9xLmP2rT8wYb4nH6jDa"


def _webhook(url: str) -> str:
    host = url.split("/")[2]
    return f"models.fraud.drift.actions=[{{kind: webhook, url: '{url}', allow_hosts: [{host}]}}]"


def test_config_show_redacts_a_webhook_url_path(capsys: pytest.CaptureFixture[str]) -> None:
    hook = f"https://hooks.slack.com/services/T0000/B0000/{SECRET}"
    assert run(["config", "show", "+recipe=fraud", _webhook(hook)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "url: https://hooks.slack.com/services/T0000/B0000/***" in out
    assert "sha256: a68d6411f907308fa10f1ca217b1fd53bec939c25b3fb02f2faec90f5be92af4" in out


def test_deploy_k8s_refuses_a_webhook_url_with_its_token_in_the_path() -> None:
    hook = f"https://discord.com/api/webhooks/1234567890/{SECRET}"
    with pytest.raises(ConfigError) as err:
        k8s.render(["+recipe=fraud", "env=prod", _webhook(hook)], k8s.Options())
    path = "models.fraud.drift.actions[0].url"
    assert str(err.value).startswith(f"{path}: a URL with a token in its path written literally")
    assert SECRET not in str(err.value)
    assert "${oc.env:WEBHOOK_URL}" in (err.value.hint or "")


def test_deploy_k8s_refuses_credentials_in_a_url_without_a_scheme() -> None:
    store = "feature_store.redis_url"
    with pytest.raises(ConfigError) as err:
        k8s.render(
            ["+recipe=fraud", "env=prod", f"{store}=admin:hunter2@redis.internal:6379/0"],
            k8s.Options(),
        )
    assert str(err.value).startswith(f"{store}: a secret written literally")
    assert "hunter2" not in str(err.value)
    # The host and port alone are no secret.
    k8s.render(["+recipe=fraud", "env=prod", f"{store}=redis.internal:6379"], k8s.Options())


@pytest.mark.parametrize("deploy", DEPLOYS)
@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_the_shipped_configs_have_nothing_to_redact(recipe: str, env: str, deploy: str) -> None:
    overrides = [f"+recipe={recipe}", f"env={env}", f"deploy={deploy}"]
    data = compose(overrides).data
    assert redact(data) == data
    assert check_secret_literals(compose_unresolved(overrides)) == []


# --- a webhook's URL stays out of its error messages (they reach the logs) ---


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"hooks.slack.com/services/T0000/B0000/{SECRET}", "not an http(s) URL with a host"),
        (f"htps://hooks.slack.com/services/T0000/B0000/{SECRET}", "scheme 'htps'"),
        # http.client would refuse it at every event, quoting the path into the error log.
        (f"https://hooks.slack.com/services/T0000/B0000/{SECRET} ", "whitespace"),
        (f"https://hooks.slack.com/x?token={SECRET}\t1", "whitespace"),
    ],
)
def test_a_webhook_config_error_does_not_show_its_url(url: str, message: str) -> None:
    pm, _ = make_plugin_manager()
    node = {"kind": "webhook", "url": url, "allow_hosts": ["hooks.slack.com"]}
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        Registry(pm).build("action", node, ComponentContext("drift.actions[0]", Path(".")))
    assert SECRET not in str(err.value) and SECRET not in (err.value.hint or "")


@pytest.mark.parametrize(
    ("key", "value", "visible"),
    [
        ("tokn", "ghp_" + "a1B2" * 9, False),  # a prefixed token under a misspelt name
        ("apikye", "8f3kQ9zX2mVb7LpA4wRt", False),  # random-looking: masked whatever its name
        ("pasword", "redis://:hunter2@redis:6379/0", False),
        ("featurs", 3, True),
        ("prot", "http", True),
        ("kidn", "distilbert-base-uncased-finetuned-sst-2-english", True),
    ],
)
def test_an_unknown_key_s_value_is_shown_only_when_it_is_no_secret(
    key: str, value: object, visible: bool
) -> None:
    import msgspec

    from infercore.config.validation import convert

    class Node(msgspec.Struct, forbid_unknown_fields=True):
        kind: str = "x"

    with pytest.raises(ConfigError) as info:
        convert({key: value}, Node, path="models.m.versions.1.loader")
    text = str(info.value)
    assert f"models.m.versions.1.loader.{key}: unknown key" in text
    secret = value if not isinstance(value, str) or "://" not in value else "hunter2"
    assert (str(secret) in text) == visible, text


# --- passwords holding '@' and '/', Go DSNs, and a secret's name with its value in text ---


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # A password with a raw '@' and '/': the userinfo ends at the last '@' a host follows.
        ("redis://:p@ss/w@host:6379/0", "redis://***@host:6379/0"),
        ("redis://:p@ss/w@redis/0", "redis://***@redis/0"),
        ("redis://:p@ss/w@redis", "redis://***@redis"),
        ("rediss://default:p@ss/w@cache.internal:6380", "rediss://***@cache.internal:6380"),
        (
            "postgresql://app:s3@cr/t@db.internal:5432/feast",
            "postgresql://***@db.internal:5432/feast",
        ),
        ("redis://:p@ss/w@[::1]:6379/0", "redis://***@[::1]:6379/0"),
        ("https://u:p@ss/w@api.example.com/v1", "https://***@api.example.com/v1"),
        ("error: redis://:p@ss/w@cache:6379, retrying", "error: redis://***@cache:6379, retrying"),
        # Go DSNs (MySQL's driver): up to the last '@' before the network or the database.
        ("user:pass@tcp(db.internal:3306)/app", "***@tcp(db.internal:3306)/app"),
        ("user:pass@unix(/run/mysqld/mysqld.sock)/app", "***@unix(/run/mysqld/mysqld.sock)/app"),
        (
            "DSN=app:p@ss/w@tcp(db:3306)/app?parseTime=true",
            "DSN=***@tcp(db:3306)/app?parseTime=true",
        ),
        ("root:pw@/app", "***@/app"),
        # A secret's name and its value: logfmt, a command line, a repr, JSON, YAML, headers.
        ("password=x", "password=***"),
        ("connect failed: password=hunter2 host=db", "connect failed: password=*** host=db"),
        ("passwd: x", "passwd: ***"),
        ("secret=abc", "secret=***"),
        ("token=abc", "token=***"),
        ("api_key=abc", "api_key=***"),
        ("access_key=AKIA0000", "access_key=***"),
        ("DB_PASS=hunter2", "DB_PASS=***"),
        ("run train.py --password=x --epochs 3", "run train.py --password=*** --epochs 3"),
        ("run train.py --token x --epochs 3", "run train.py --token *** --epochs 3"),
        ("--verbose password=x", "--verbose password=***"),
        ("Hydra: db.password='x y'", "Hydra: db.password='***'"),
        ("{'password': 'hunter2', 'user': 'bob'}", "{'password': '***', 'user': 'bob'}"),
        ('{"api_key": "k3y", "n": 1}', '{"api_key": "***", "n": 1}'),
        ('{"token": 12345}', '{"token": ***}'),
        ("{user: bob, password: hunter2}", "{user: bob, password: ***}"),
        ("X-Api-Key: abc123", "X-Api-Key: ***"),
        ("Authorization: Bearer abc123def456", "Authorization: Bearer ***"),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
        ("cache:6379,db=1,password=s3cr@t", "cache:6379,db=1,password=***"),  # Feast's Redis
        # A token its prefix names keeps the prefix.
        ("token=ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token=ghp_***"),
        # Environment variables whose one word holds the secret word, or whose words do.
        ("PGPASSWORD=hunter2", "PGPASSWORD=***"),
        ("export PGPASSWORD=hunter2 && psql -h db", "export PGPASSWORD=*** && psql -h db"),
        ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI", "AWS_SECRET_ACCESS_KEY=***"),
        ("MY_API_TOKEN=abc123", "MY_API_TOKEN=***"),
        ("REDIS_PASSWORD: x", "REDIS_PASSWORD: ***"),
        ("GITHUBTOKEN=abc123 make release", "GITHUBTOKEN=*** make release"),
        ("password2=hunter2", "password2=***"),
        # An unquoted value runs to a space, a quote or a closing bracket, commas and all ...
        ("password=a,b", "password=***"),
        ("password=hunter2,b", "password=***"),
        ("password=a;b c", "password=*** c"),
        ("password=a&b", "password=***"),
        ("{password: a,b}", "{password: ***}"),
        # ... but not past a clause's end or the next pair's name.
        ("password=abc, user=bob", "password=***, user=bob"),
        ("password=abc,user=bob", "password=***,user=bob"),
        ("cache:6379,password=s3cr@t,ssl=true", "cache:6379,password=***,ssl=true"),
        ("Server=db;Uid=sa;Pwd=s3cret;Database=app", "Server=db;Uid=sa;Pwd=***;Database=app"),
        ("a=1&password=x1&b=2", "a=1&password=***&b=2"),
        ("(password=abc,)", "(password=***,)"),
        # A quoted value is the whole string.
        ('"password": "x", "user": "y"', '"password": "***", "user": "y"'),
        ('"password": "a, b", "user": "y"', '"password": "***", "user": "y"'),
        # However long the value: no count of commas nor length leaves its tail shown.
        ("password=" + ",".join(["ab"] * 12), "password=***"),
        ("secret=abc,def,ghi,jkl,mno,pqr,stu,vwx,yz0,123,234", "secret=***"),
        ("password=a," + "b" * 200 + " host=db", "password=*** host=db"),
        ("password=" + "a" * 2000 + " host=db", "password=*** host=db"),
        ("passwd: " + "a" * 2000, "passwd: ***"),
        ('{"token": "' + "a" * 2000 + '", "n": 1}', '{"token": "***", "n": 1}'),
        ("Authorization: Bearer " + "a" * 2000 + " x", "Authorization: Bearer *** x"),
        (
            "cache:6379,password=" + ",".join(["ab"] * 12) + ",ssl=true",
            "cache:6379,password=***,ssl=true",
        ),
        ("cache:6379,password=" + "x" * 2000 + ",ssl=true", "cache:6379,password=***,ssl=true"),
        # ``name = value``, as INI files (AWS credentials) and TOML write it, ending its clause.
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG", "aws_secret_access_key = ***"),
        (
            "[default]\naws_secret_access_key = wJalrXUtnFEMI\nregion = eu-west-1",
            "[default]\naws_secret_access_key = ***\nregion = eu-west-1",
        ),
        ("DB_PASSWORD = hunter2", "DB_PASSWORD = ***"),
        ('password = "hunter2"', 'password = "***"'),
        ("password= hunter2", "password= ***"),
        ("{token = abc, user = bob}", "{token = ***, user = bob}"),
    ],
)
def test_redact_text_masks_passwords_dsns_and_named_values(text: str, shown: str) -> None:
    assert redact_text(text) == shown
    assert redact({"value": text}) == {"value": shown}
    assert secret_paths({"value": text}) == ["value"]


@pytest.mark.parametrize(
    "text",
    [
        # Prose that mentions a secret, infercore's own messages among it.
        "the token expired",
        "token: expected str, got int",
        "models.m.loader.token: missing",
        "password: too short (16 characters at least)",
        'FATAL: password authentication failed for user "bob"',
        "no admin token: pass --token or set INFERCORE_ADMIN_TOKEN",
        "pass --token to it, or --token-file",
        "token=None",
        "auth: off",
        "Authorization: Basic auth is not supported",
        # Names that are no secret's, and lone words that name too much in logs.
        "max_tokens=5 tokenizer=bert token_file=/run/t auth_env=ADMIN_TOKEN",
        "cache miss for key=42 (session=3, pass=2)",
        "signature=(a, b) keys=3",
        # URLs: an '@' in an http(s) path, a port, no userinfo.
        "https://medium.com/@user/post",
        "https://h:8080/a/b@c.com",
        "https://registry.npmjs.org/@scope/pkg",
        "alerts@example.com",
        "git@github.com:acme/models.git",
        "ratio 3:2 at tcp(127.0.0.1:80)",
        # A secret word that only starts a word, a count, a pointer; prose about secrets.
        "max_tokens=16 tokens=5 tokenizer=bert token_count=5 token_limit=4096",
        "secretary=bob secrets: 3",
        "passwords must be at least 12 characters",
        "passwords: must be at least 12 characters",
        "PGPASSWORD: must be set",
        "PGPASSFILE=/run/pgpass",
        "compass=north OLDPWD=/home/x",
        # ``=`` with spaces: names that are no secret's, comparisons, prose; a secret's name
        # and a word with only a space between them is prose (``pass --token`` above).
        "x = 5",
        "tokens = 3",
        "max_tokens = 16",
        "a == b",
        "if password == expected:",
        "the token = a string of 32 characters",
        "password = hunter2 is what the docs show",
        "pgpassword hunter2",
    ],
)
def test_redact_text_leaves_prose_names_and_addresses(text: str) -> None:
    assert redact_text(text) == text


def test_an_at_in_a_web_path_is_no_end_of_userinfo() -> None:
    # http(s) paths hold '@' (``/@user``) more often than passwords hold '/': a bare word
    # after one is no host, nor is a segment that starts with one.
    assert redact_text("https://u:p@ss@host/path@x") == "https://***@host/path@x"
    assert redact_text("https://u:pw@medium.com/@user/post") == "https://***@medium.com/@user/post"


def test_drift_errors_are_scrubbed_of_named_values_and_dsns() -> None:
    from infercore.drift.events import scrub

    line = scrub(
        "OperationalError: connection to app:p@ss/w@tcp(db:3306)/app failed: "
        "password=hunter2 token: 's3cret'"
    )
    assert line == (
        "OperationalError: connection to ***@tcp(db:3306)/app failed: password=*** token: '***'"
    )


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "api_key",
        "token",
        "secret",
        "authorization",
        "db_password",
        "refresh_token",
        "client_secret",
        "Proxy-Authorization",
        "PGPASSWORD",
        "MY_API_TOKEN",
    ],
)
@pytest.mark.parametrize("value", ["plain words", 12345, 1.5, ["a", "b"], {"nested": "x"}])
def test_a_mapping_key_that_names_a_secret_masks_any_value(key: str, value: object) -> None:
    out = redact({"payload": {key: value, "model": "fraud"}})
    masked = (
        {"nested": "***"}
        if isinstance(value, dict)
        else (["***", "***"] if isinstance(value, list) else "***")
    )
    assert out == {"payload": {key: masked, "model": "fraud"}}


def test_a_value_rejected_after_it_was_followed_to_its_end_is_searched_from_its_value() -> None:
    # ``token: <run> x`` is prose (the value does not end its clause); the pairs inside the
    # run are searched again, each reusing where the run ends, and are prose too.
    text = "token: " + "a,token:" * 500 + "a x"
    assert redact_text(text) == text
    assert redact_text(text + "\npassword=" + "b," * 600 + "c") == text + "\npassword=***"


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ({"name": "PGPASSWORD", "value": "hunter2"}, {"name": "PGPASSWORD", "value": "***"}),
        ({"name": "DB_PASS", "value": 1234}, {"name": "DB_PASS", "value": "***"}),
        ({"Name": "API_TOKEN", "Value": "abc"}, {"Name": "API_TOKEN", "Value": "***"}),
        # A name that is no secret's: the value is redacted as any text is.
        ({"name": "LOG_LEVEL", "value": "debug"}, {"name": "LOG_LEVEL", "value": "debug"}),
        (
            {"name": "REDIS_URL", "value": "redis://:pw@cache:6379"},
            {"name": "REDIS_URL", "value": "redis://***@cache:6379"},
        ),
        # A switch stays; a mapping with more keys than a name and a value is no such entry.
        ({"name": "PGPASSWORD", "value": True}, {"name": "PGPASSWORD", "value": True}),
        (
            {"name": "PGPASSWORD", "value": "x", "kind": "env"},
            {"name": "PGPASSWORD", "value": "x", "kind": "env"},
        ),
    ],
)
def test_a_name_value_entry_is_keyed_by_its_name(
    entry: dict[str, object], shown: dict[str, object]
) -> None:
    # A Kubernetes container's env, an ECS task's environment.
    assert redact({"env": [entry]}) == {"env": [shown]}


def test_the_literal_check_names_a_secret_env_entry_s_value() -> None:
    env = [
        {"name": "PGPASSWORD", "value": "hunter2"},
        {"name": "API_TOKEN", "value": "${oc.env:API_TOKEN}"},
        {"name": "LOG_LEVEL", "value": "debug"},
    ]
    assert secret_paths({"env": env}) == ["env[0].value"]


# --- a {name, value} entry written in text; the key of a secretKeyRef ---


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # JSON (a Kubernetes API error quoting the pod spec), a Python repr, YAML flow.
        (
            'invalid env: {"name": "PGPASSWORD", "value": "hunter2"}',
            'invalid env: {"name": "PGPASSWORD", "value": "***"}',
        ),
        (
            "{'name': 'AWS_SECRET_ACCESS_KEY', 'value': 'abc'}",
            "{'name': 'AWS_SECRET_ACCESS_KEY', 'value': '***'}",
        ),
        ("{name: DB_PASSWORD, value: s3cret}", "{name: DB_PASSWORD, value: ***}"),
        # The value first; field names in any case; a Java map; spaces and lines around.
        ("{value: s3cret, name: DB_PASSWORD}", "{value: ***, name: DB_PASSWORD}"),
        ('{"value": "a, b", "name": "API_TOKEN"}', '{"value": "***", "name": "API_TOKEN"}'),
        ('{"Name": "PGPASSWORD", "Value": "x"}', '{"Name": "PGPASSWORD", "Value": "***"}'),
        ("{name=PGPASSWORD, value=hunter2}", "{name=PGPASSWORD, value=***}"),
        (
            '{\n  "name": "PGPASSWORD",\n  "value": "hunter2"\n}',
            '{\n  "name": "PGPASSWORD",\n  "value": "***"\n}',
        ),
        ("{name: PGPASSWORD, value: two words }", "{name: PGPASSWORD, value: *** }"),
        # Escaped quotes, a number, a token its prefix names: the whole value, as redact() does.
        ('{"name":"DB_PASS","value":"a\\"b"}', '{"name":"DB_PASS","value":"***"}'),
        ('{"name": "DB_PASS", "value": 1234}', '{"name": "DB_PASS", "value": ***}'),
        (
            '{"name": "GITHUB_TOKEN", "value": "ghp_abcdefghijklmnopqrstuvwxyz0123456789"}',
            '{"name": "GITHUB_TOKEN", "value": "***"}',
        ),
        # A list of them: each by its own name.
        (
            '[{"name": "LOG_LEVEL", "value": "debug"}, {"name": "REDIS_PASSWORD", "value": "x"}]',
            '[{"name": "LOG_LEVEL", "value": "debug"}, {"name": "REDIS_PASSWORD", "value": "***"}]',
        ),
        # A client's repr of an env var has a third field.
        (
            "{'name': 'PGPASSWORD', 'value': 'hunter2', 'value_from': None}",
            "{'name': 'PGPASSWORD', 'value': '***', 'value_from': None}",
        ),
    ],
)
def test_redact_text_masks_the_value_of_a_secret_s_env_entry(text: str, shown: str) -> None:
    assert redact_text(text) == shown
    assert redact({"error": text}) == {"error": shown}


@pytest.mark.parametrize(
    "text",
    [
        # A name that is no secret's; no value; a null and a boolean, as redact() leaves them.
        '{"name": "LOG_LEVEL", "value": "debug"}',
        "{name: MAX_TOKENS, value: 16}",
        '{"name": "PGPASSWORD", "value": ""}',
        '{"name": "PGPASSWORD", "value": null}',
        "{'name': 'PGPASSWORD', 'value': None}",
        "{name: API_TOKEN, value: true}",
        # The value comes from a Secret: its name and key are shown.
        "{name: PGPASSWORD, valueFrom: {secretKeyRef: {name: db, key: password}}}",
        '{"secretKeyRef": {"name": "db", "key": "password"}}',
        # Two names, two values: no such entry.
        "{name: PGPASSWORD, name: hunter2}",
    ],
)
def test_redact_text_leaves_env_entries_that_hold_no_secret(text: str) -> None:
    assert redact_text(text) == text


def test_an_env_entry_read_from_the_environment_is_no_literal() -> None:
    text = "{name: API_TOKEN, value: ${oc.env:API_TOKEN,none}}"
    assert redact_text(text, references=True) == text
    assert redact_text(text) == "{name: API_TOKEN, value: ***}"


@pytest.mark.parametrize(
    "text",
    [
        # Where a plain value could end, and where an entry could start, over and over: each
        # tried from every brace would cost quadratic time (minutes here), not linear.
        "{value: a" + " " * 200_000 + "x",
        "{name: LOG_LEVEL, value: a" + " " * 200_000 + "x",
        "{value: a" * 22_000,
        "{value: ${" * 20_000,
        "{'value': \"{\"value\": '" * 9_000,
        '{"value": "' + '\\"' * 100_000,
        ("{" + " " * 60) * 3_000,
        "{name: a, name: b, " * 10_000,
        '{"value": "x",' * 14_000,
    ],
)
def test_env_entries_are_found_in_linear_time(text: str) -> None:
    # No clock: the suite's timeout (pyproject.toml) fails a quadratic search.
    assert redact_text(text) == text
    tail = ', {"name": "PGPASSWORD", "value": "hunter2"}'
    assert redact_text(text + "\n" + tail) == text + "\n" + tail.replace("hunter2", "***")


def test_the_key_of_a_secret_key_ref_is_shown_and_a_bare_key_masked() -> None:
    env = [
        {"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
    ]
    assert redact({"env": env}) == {"env": env}
    assert secret_paths({"env": env}) == []
    # A key elsewhere is a secret, as before: top level, below a secret, in a non-reference.
    assert redact({"key": "abc", "auth": {"key": "abc"}, "keys": {"key": "abc"}}) == {
        "key": "***",
        "auth": {"key": "***"},
        "keys": {"key": "***"},
    }
    # A reference below a secret key stays masked whole; a reference's value is still text.
    assert redact({"credentials": {"secretKeyRef": {"name": "db", "key": "pw"}}}) == {
        "credentials": {"secretKeyRef": {"name": "***", "key": "***"}}
    }
    assert redact({"secretKeyRef": {"name": "db", "key": "redis://:pw@cache:6379"}}) == {
        "secretKeyRef": {"name": "db", "key": "redis://***@cache:6379"}
    }
