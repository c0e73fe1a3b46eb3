"""Finding secrets in config data and in text, and masking them.

One implementation for every place that shows config or errors: ``infercore config show``
masks what :func:`redact` finds, ``infercore deploy k8s`` refuses what :func:`secret_paths`
finds written literally (it would end up in a ConfigMap), drift events scrub their errors
with :func:`redact_text` and their detectors' ``info`` with :func:`redact`, and the runtime
its model load failures (``Runtime.scrub``), before the admin API, webhooks and the logs show
them (RELIABILITY S6).

A value is secret when its key names one (``token``, ``password``, ``PGPASSWORD`` …), or in a
``{name: …, value: …}`` entry (a Kubernetes ``env``, as data or written in text) its name
does; the ``key`` of a reference (``secretKeyRef: {name: db, key: password}``) names a key in
a Secret and is none. In any text, the credentials of a URL (with a scheme or without:
``redis://:pw@host``, ``user:pw@redis.internal:6379``) or of a Go DSN
(``user:pw@tcp(db:3306)/app``), its secret or random-looking query values, a webhook's token
in its path, tokens that their prefix names (``ghp_…``, ``sk-…``) and the value after a name
that names a secret (``password=…``, ``"token": "…"``, ``password = …``, ``--api-key …``),
to its end, are. Names, versions, file
names and paths, hosts and ports, UUIDs and digests with their algorithm, and prose that only
mentions a secret ("the token expired", "pass --token or set …") stay visible. Only the
standard library is imported: the drift code imports this on its own.

Nothing here runs per request: config composition and ``config show``, config errors
(:func:`shown`), model load failures, drift results and detector and action errors, deploy
checks.
"""

from __future__ import annotations

import functools
import itertools
import re
import urllib.parse
from collections.abc import Iterator
from typing import Any

#: Words of a key name (split at ``_``, ``-``, ``.`` and camelCase) that mark its value secret
#: wherever they stand (``db_password``, ``AWS_SECRET_ACCESS_KEY``); whole words, so
#: ``max_tokens`` and ``tokenizer`` stay visible. ``authorization`` and ``cookie`` are the HTTP
#: headers that carry credentials (a webhook's ``headers:``).
_SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "apikey",
        "credential",
        "credentials",
        "authorization",
        "cookie",
        "sessionid",
    }
)
#: Words that mark a secret only as the key's last word, the thing it names: ``DB_PASS``,
#: ``private_key``, ``X-Signing-Key``, ``x-api-key``, ``sig``, ``X-Hub-Signature-256``,
#: ``X-Auth``, ``session``. In front of another word they qualify it: ``key_field``,
#: ``auth_env``, ``pass_env``, ``signature_version``, ``session_ttl``.
_SECRET_HEADS = frozenset({"pass", "pwd", "key", "sig", "signature", "auth", "session"})
#: Words before a head word that make it data, not a secret: a feature store's ``join_key``,
#: a ``public_key``, a ``partition_key``, a ``first_pass``.
_PLAIN_QUALIFIERS = frozenset(
    {
        "public",
        "join",
        "primary",
        "foreign",
        "sort",
        "partition",
        "shard",
        "cache",
        "routing",
        "entity",
        "lookup",
        "row",
        "object",
        "group",
        "idempotency",
        "dedup",
        "sticky",
        "feature",
        "column",
        "index",
        "first",
        "second",
        "last",
        "single",
        "multi",
    }
)
#: Last words that say the value only names or locates the secret, and is none itself:
#: ``auth_env``, ``token_file``, ``password_path``, ``secret_name``, ``api_key_header``,
#: ``token_url``, ``secret_ref`` (Kubernetes' ``secretKeyRef``: a Secret's name and key).
_POINTER_WORDS = frozenset(
    {"env", "var", "file", "path", "dir", "name", "header", "field", "url", "ref"}
)
#: Last words that say the value measures or describes the secret and is none itself:
#: ``token_count``, ``token_limit``, ``password_length``, ``token_ttl``, ``token_type``,
#: ``secret_version``. (Not ``id``: Vault's ``secret_id`` is a credential.)
_MEASURE_WORDS = frozenset(
    {
        "count",
        "limit",
        "length",
        "len",
        "size",
        "ttl",
        "timeout",
        "expiry",
        "budget",
        "usage",
        "type",
        "version",
    }
)
#: Secret words that mark a word written without separators as a secret's name when they end
#: it (:func:`_compound_secret`): ``PGPASSWORD``, ``mysqlpasswd``, ``GITHUBTOKEN``,
#: ``clientsecret``, ``myapikey``, ``gcpcredentials``.
_COMPOUND_ENDS = ("password", "passwd", "secret", "token", "apikey", "credential", "credentials")
_KEY_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
#: Where an authority ends: the path, query or fragment, or the URL's end (a space, a quote, a
#: closing bracket, punctuation).
_HOST_END = r"(?=[/?#\s\"'`<>)\]},;]|$)"
#: An '@' that may end a userinfo, and the authority after it; never an '@' that starts a path
#: segment (``https://h/@user``). Any host name with its port or none (``redis``,
#: ``cache:6379``) ...
_AT_ANY_HOST = (
    r"(?<!/)@(?:\[[0-9a-f:.]+\]|[a-z0-9_](?:[a-z0-9_.\-]{0,253}[a-z0-9_])?)"
    rf"(?::\d{{1,5}})?{_HOST_END}"
)
#: ... or, in an ``http(s)``/``ws(s)`` URL, whose paths hold '@' (``/@user``, ``/npm/@scope``)
#: far more often than its passwords hold '/', a host that only a host can be (``localhost``,
#: an IPv4 address, an IPv6 one in brackets, a dotted name ending in letters) or any name with
#: a port or followed by a path: not a bare word that ends the URL (``…/path@x``).
_AT_WEB_HOST = (
    r"(?<!/)@(?:"
    r"(?:\[[0-9a-f:.]+\]|localhost|\d{1,3}(?:\.\d{1,3}){3}"
    r"|(?:[a-z0-9_][a-z0-9_\-]{0,62}\.)+[a-z]{2,63})"
    rf"(?::\d{{1,5}})?{_HOST_END}"
    rf"|[a-z0-9_][a-z0-9_\-]{{0,62}}(?::\d{{1,5}}{_HOST_END}|(?=[/?#]))"
    r")"
)
#: ``user:password`` (the ':' followed by no port: ``https://h:8080/a/b@c.com`` has none).
_USER_PASSWORD = r"[^/\s@:]{0,256}:(?!\d*(?:[/?#]|$))\S{0,256}"
#: The userinfo of a URL with a scheme. ``user:password`` ends at the LAST '@' that an
#: authority follows: RFC 3986 wants '@' and '/' in a password percent-encoded, people paste
#: them raw (``redis://:p@ss/w@host:6379/0``: URL parsers read host ``ss``; Redis and Postgres
#: users mean ``host``). Else (no ':') everything up to the last '@' before the path. A URL
#: with userinfo whose path holds an '@' inside a segment, a host name after it, is masked up
#: to that '@' (``redis://u:p@h/0@x`` as ``redis://***@x``): more than its userinfo, never less.
_URL_CREDS = re.compile(
    r"(?<![a-z0-9+.\-])(?P<scheme>(?:(?P<web>https?|wss?)|[a-z][a-z0-9+.\-]*)://)"
    rf"(?P<creds>(?(web){_USER_PASSWORD}(?={_AT_WEB_HOST})|{_USER_PASSWORD}(?={_AT_ANY_HOST}))"
    r"|[^/\s]+)@",
    re.I,
)
#: The credentials of a Go DSN (``user:pw@tcp(db:3306)/app``, ``user:pw@unix(/run/my.sock)/app``,
#: ``user:pw@/app``), up to the last '@' before the network and its address in brackets (or
#: before the database's '/'); the DSN starts the text or follows a space, a quote, an ``=``,
#: a bracket or a comma (as a URL without a scheme does).
_DSN_CREDS = re.compile(
    r"(?<![^\s\"'`=(<\[{,;|])"
    r"[^\s/@:\"'`<>=(\[{,;|]{0,128}:[^\s\"'`]{0,256}"
    r"@(?=[a-z][a-z0-9]{0,15}\([^\s()]{0,256}\)/|/[\w.\-]{0,64}(?:[?\s\"'`]|$))",
    re.I,
)
# A scheme starts a word: a scan from inside a long word (a base64 blob) would be quadratic.
_SCHEME = re.compile(r"(?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]*://", re.I)
_URL = re.compile(r"(?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]*://[^\s\"'<>]+", re.I)
#: A URL written without its scheme: ``hooks.slack.com/services/…``,
#: ``user:pw@redis.internal:6379/0``, ``redis:6379?password=…``. Its host is ``localhost``, an
#: IPv4 address, a dotted name ending in letters (``redis.internal``, not ``model.v1``), or any
#: name with a port; it starts the text or follows a space, a quote, an ``=``, a bracket or a
#: comma (so never inside a path: ``recipes/fraud.yaml``), and an address's own scheme
#: (``mailto:a@example.com``) is no userinfo. A file name (``model.onnx``) matches too, with
#: nothing to mask. Userinfo is bounded (128 and 256 characters): a text with many places
#: where one could start costs linear time, not quadratic.
_BARE_URL = (
    r"(?<![^\s\"'`=(<\[{,;|])"
    r"(?!(?:mailto|sips?|tel|xmpp|urn|news):)"
    r"(?:[^\s/@:\"'`<>=(\[{,;|]{0,128}:[^\s/\"'`<>]{0,256}@)?"
    r"(?:localhost|\d{1,3}(?:\.\d{1,3}){3}|(?:[a-z0-9][a-z0-9\-]*\.)+[a-z]{2,63}"
    r"|[a-z0-9][a-z0-9\-]*(?=:\d))"
    r"(?::\d{1,5})?(?![\w\-@]|\.\w|:\d)"
    r"(?:[/?#][^\s\"'`<>]*)?"
)
#: A URL's path with its query, without scheme or host, as HTTP clients quote it in errors
#: (``Max retries exceeded with url: /drift?token=…``). A path without a query is not one;
#: nor is one holding a character after which another could start (linear time).
_PATH_WITH_QUERY = r"(?<![^\s\"'`=(<\[{,;|])/[^\s?#\"'`<>=(\[{,;|]{0,2048}[?#][^\s\"'`<>]*"
#: Every URL in a text, with its scheme or without.
_URLS = re.compile(rf"{_URL.pattern}|{_BARE_URL}|{_PATH_WITH_QUERY}", re.I)
#: A query (or fragment) parameter of a URL: ``?access_token=…``, ``&sig=…``, ``#token=…``;
#: or a bare value, ``?<token>``.
_URL_PARAM = re.compile(
    r"(?P<sep>[?&;#])(?P<name>[^=&;#?\s]+)"  # the name (a bare value has only this)
    r"(?:(?P<eq>=)(?P<value>[^&;#?\s]*))?"
)
#: Parameter names whose value is a digest, which may look random and is no secret:
#: ``?sha256=…``, ``&digest=…``, ``X-Content-SHA256``.
_DIGEST_NAME = re.compile(r"sha\d*|md5|blake2[bs]?|crc32c?|digest|checksum|etag")
#: An argument with its value: ``--password=…``, ``-token=…``, a Hydra ``db.password=…``.
_ARG_WITH_VALUE = re.compile(r"(?P<name>[-+~]{0,2}[A-Za-z_][\w.\-]*)=(?P<value>.*)", re.S)
#: An option whose value is the next argument: ``--password …``.
_ARG_OPTION = re.compile(r"--(?P<name>[A-Za-z][\w.\-]*)")
#: A character of an unquoted value, and a ``,``, ``;`` or ``&`` that does not end one (see
#: :data:`_TEXT_PAIR`).
_VALUE_CHAR = r"[^\s,;&\"'`<>)\]}]"
_VALUE_GOES_ON = r"[,;&](?![\s,;&\"'`<>)\]}]|$|[-+~]{0,2}[A-Za-z_][\w.\-]{0,127}=)"
#: A name with its value in text (an error message, a command line in it, logfmt, a dict's
#: repr, JSON, YAML, INI): ``password=…``, ``--token=…``, ``db.password='…'``, ``"api_key":
#: "…"``, ``passwd: …``, ``aws_secret_access_key = …``, ``Authorization: Bearer …``,
#: ``--token …``. The name starts a word; :func:`_text_pair` decides whether the name is a
#: secret's and the value one (prose is not: "pass --token or set INFERCORE_ADMIN_TOKEN",
#: "token: expected str"). A name and its value with only a space between them
#: (``pgpassword hunter2``) are prose to it.
#:
#: A quoted value is the whole quoted string (``"password": "x", "user": "y"`` masks ``x``).
#: An unquoted one runs to a space, a quote or a closing bracket: passwords hold ``,``, ``;``
#: and ``&`` (``password=a,b`` masks ``a,b``). One of those three ends it only before a space,
#: a quote, a bracket or the end (``{password: x, user: y}``) or before the next ``name=``
#: (``host:6379,password=x,ssl=true``, ``Pwd=x;Database=app``, ``a=1&token=x&b=2``).
#: Runs of plain characters are matched whole (a character class is fast) and their number
#: and length bounded, so that a pair rejected and searched again from its value costs
#: linear time; a value that is judged a secret's is masked to its true end, however long
#: (:data:`_VALUE_REST`).
_TEXT_PAIR = re.compile(
    r"(?<![\w.\-+~*])"
    r"(?:(?P<option>--[A-Za-z][\w.\-]{0,127})[ \t]+(?![-*])"
    r"|(?P<quote>[\"']?)(?P<name>[-+~]{0,2}[A-Za-z_][\w.\-]{0,127})(?P=quote)"
    r"(?P<sep>=(?![ \t])|[ \t]*=(?!=)[ \t]*|[ \t]*:[ \t]*))"
    r"(?P<auth_scheme>(?i:bearer|basic|token|digest|bot)[ \t]+)?"
    # A quoted string longer than 1024 characters matches unclosed (its rest is found later).
    r"(?P<value>\"(?:[^\"\\\n]|\\.){0,1024}+(?:\"|(?=[^\"\n]))"
    r"|'(?:[^'\\\n]|\\.){0,1024}+(?:'|(?=[^'\n]))"
    rf"|{_VALUE_CHAR}{{1,1024}}(?:{_VALUE_GOES_ON}{_VALUE_CHAR}{{0,128}}){{0,8}})"
)
#: The rest of a value that :data:`_TEXT_PAIR` found cut short, to its true end: of an
#: unquoted value, by the same rule; of a quoted one, to its closing quote.
_VALUE_REST = {
    "": re.compile(rf"{_VALUE_CHAR}*+(?:{_VALUE_GOES_ON}{_VALUE_CHAR}*+)*+"),
    '"': re.compile(r'(?:[^"\\\n]|\\.)*+"?'),
    "'": re.compile(r"(?:[^'\\\n]|\\.)*+'?"),
}
#: A ``{name: …, value: …}`` entry written in text (:func:`_redact_env_entries`): JSON
#: (``{"name": "PGPASSWORD", "value": "x"}``), a Python repr (``{'name': …, 'value': …}``),
#: YAML flow (``{name: DB_PASSWORD, value: x}``), a Java map (``{name=…, value=…}``); its
#: first two fields, in either order (field names in any case, as :func:`_entry_name` takes
#: them). A value is a quoted string or a plain one, which runs to a comma, a bracket or the
#: line's end (YAML's flow style allows none of them in it), an interpolation's braces aside
#: (``${oc.env:PGPASSWORD}``). Each is matched possessively, and none can hold the start of
#: another of its kind (a quoted one ends at the quote that would open one after a field's
#: name; a plain one holds no brace but an interpolation's), so that the entries tried from
#: every brace in a text cost linear time together.
_ENV_PLAIN = r"[^,{}\[\]\n$]|\$(?!\{)|\$\{[^{}\n]*+\}"
_ENV_SCALAR = (
    r"\"(?:[^\"\\\n]|\\.)*+\""
    r"|'(?:[^'\\\n]|\\.)*+'"
    rf"|(?![\s\"'])(?:{_ENV_PLAIN})++"
)
_ENV_FIELD = r"(?P<{0}q>[\"']?)(?P<{0}>(?i:name|value))(?P={0}q)[ \t]*[:=][ \t]*(?P<{0}v>{1})"
_ENV_ENTRY = re.compile(
    r"\{\s{0,64}"
    + _ENV_FIELD.format("a", _ENV_SCALAR)
    + r"[ \t]*,\s{0,64}"
    + _ENV_FIELD.format("b", _ENV_SCALAR)
)
#: Plain values of an entry that are no string (JSON, YAML, Python): :func:`redact` leaves
#: ``None`` and booleans as they are.
_ENV_NO_STRING = frozenset({"null", "none", "~", "true", "false"})
#: Text without any of these holds no name of a secret (:func:`_text_secret_key`): one scan
#: in C spares the pairs' search most texts.
_SECRET_HINT = re.compile(r"tok|secret|pass|pwd|key|auth|cred|cookie|session|sig", re.I)
#: What follows a value that ends its clause: ``passwd: x``, ``{password: x, user: y}``.
_CLAUSE_END = re.compile(r"[ \t]*(?:[,;)\]}\r\n]|$)")
#: Head words (:data:`_SECRET_HEADS`) that alone name too many things in prose and logs to mark
#: the value after them secret (``key=42`` is a cache's or a row's key; ``session: 3``): in
#: text, a name needs more (``api_key``, ``private_key``, ``X-Session``). Config keys and
#: argument lists keep them.
_PROSE_HEADS = frozenset({"key", "pass", "session", "sig", "signature"})
#: Words after a secret's name that are prose or a state, not a value: ``token: expected
#: str``, ``--token or --token-file``, ``password: missing``, ``token=None``.
_PROSE_VALUES = frozenset(
    {
        "a",
        "an",
        "the",
        "to",
        "or",
        "and",
        "is",
        "are",
        "was",
        "be",
        "in",
        "of",
        "for",
        "from",
        "with",
        "as",
        "by",
        "if",
        "not",
        "no",
        "none",
        "null",
        "nil",
        "true",
        "false",
        "set",
        "unset",
        "missing",
        "required",
        "expected",
        "unknown",
        "invalid",
        "empty",
        "must",
        "instead",
        "on",
        "off",
        "yes",
        "enabled",
        "disabled",
    }
)

#: Tokens whose prefix names them, masked wherever they stand in a string, in a URL or not (a
#: GitHub token in a command's argv, an OpenAI key in a description). The prefix stays visible:
#: it says which token to rotate. The prefix must start a word and the body be as long as its
#: issuer makes it, in its alphabet, with two of lowercase, uppercase and digits
#: (:func:`_mixed`), so that words do not match: ``sk-learn-compatible-models``,
#: ``xoxb-your-token-here``, ``task-1234…``.
_PREFIXED_TOKENS = tuple(
    re.compile(rf"(?<![A-Za-z0-9])(?P<prefix>{prefix})(?P<body>{body})(?![A-Za-z0-9])")
    for prefix, body in (
        (r"gh[pousr]_", r"[A-Za-z0-9]{36,}"),  # GitHub
        (r"github_pat_", r"[A-Za-z0-9_]{22,}"),  # GitHub, fine-grained
        (r"glpat-", r"[A-Za-z0-9_\-]{20,}"),  # GitLab
        (r"xox[abeoprs]-|xapp-", r"[A-Za-z0-9\-]{10,}"),  # Slack
        (r"sk-", r"[A-Za-z0-9_\-]{20,}"),  # OpenAI, Anthropic, DeepSeek …
        (r"[rs]k_(?:live|test)_", r"[A-Za-z0-9]{16,}"),  # Stripe
        (r"hf_", r"[A-Za-z0-9]{30,}"),  # Hugging Face
        (r"npm_", r"[A-Za-z0-9]{36,}"),  # npm
        (r"AIza", r"[A-Za-z0-9_\-]{35}"),  # Google API key (Google Chat's ?key=)
        (r"A[KS]IA", r"[A-Z0-9]{16}"),  # AWS access key id
        (r"eyJ", r"[\w\-]{8,}\.eyJ[\w\-]{8,}\.[\w\-]{8,}"),  # a JWT (a bearer token)
    )
)
_PRIVATE_KEY = re.compile(
    r"(?P<begin>-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----)(?P<body>.+?)(?=-----END|\Z)", re.S
)
#: Hosts of webhooks whose path holds the secret, each with where it sits (see
#: :func:`_known_secret_segments`). Their IDs (Slack's team and channel, Discord's webhook
#: id, Teams' group and tenant) stay visible: they help to recognise the URL and grant nothing.
_SLACK_HOSTS = frozenset({"hooks.slack.com", "hooks.slack-gov.com"})
_DISCORD_HOSTS = frozenset(
    f"{sub}{domain}"
    for sub in ("", "canary.", "ptb.")
    for domain in ("discord.com", "discordapp.com")
)
_TEAMS_HOSTS = (".webhook.office.com", "outlook.office.com", "outlook.office365.com")
#: Hosts whose paths hold only IDs and whose secret is a query parameter (Power Automate and
#: Logic Apps, as Teams workflows use them: ``…/workflows/<32 hex>/triggers/…?sig=…``):
#: their paths are not searched for random-looking segments.
_SIGNED_QUERY_HOSTS = (".logic.azure.com", ".api.powerplatform.com")
#: Schemes whose URLs are requested, and so may be capability URLs (whoever knows the URL may
#: POST to it): only their paths are searched for random-looking segments. Object stores and
#: databases (``s3://bucket/0/<run id>/model.onnx``, ``redis://host/0``) carry credentials in
#: the userinfo or the query, masked anyway; their paths name things.
_REQUESTED_SCHEMES = frozenset({"http", "https", "ws", "wss"})
#: A path segment that may be a random token: token characters only (base64url, hex), so a
#: file name (``model.onnx``), a version (``1.2.3``), a digest with its algorithm
#: (``sha256:…``) or an interpolation never is.
_TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9_\-]{20,}")
#: A query value that may be a random token: base64url, hex or base64 (``+`` and ``/``; its
#: ``=`` padding stripped), percent-decoded.
_TOKEN_VALUE = re.compile(r"[A-Za-z0-9_\-+/]{20,}")
#: Trailing characters of a URL found in text that are not part of it: punctuation, and the
#: ``}`` of an interpolation whose default is the URL (``${oc.env:HOOK,https://…}``).
_URL_TAIL = re.compile(r"[.,;:!?)\]}'\"]+$")


def _compound_secret(word: str) -> bool:
    """Whether one word of a key, written without separators (an environment variable's
    ``PGPASSWORD``), names a secret: it ends with a secret word (:data:`_COMPOUND_ENDS`;
    ``pgpassword``, ``githubtoken``, ``password2``), or starts with one and ends with ``key``
    (``secretkey``, ``secretaccesskey``). A secret word that only starts the word is prose or
    a name: ``tokenizer``, ``tokens``, ``secretary``, ``passwords``, ``passwordless``."""
    word = word.rstrip("0123456789")  # lowercase words keep their digits: password2
    if word.endswith(_COMPOUND_ENDS):
        return True
    return any(word.startswith(end) and word[len(end) :].endswith("key") for end in _COMPOUND_ENDS)


def _secret_key(key: str) -> bool:
    """Whether a key (a config key, a header, an environment variable, a URL parameter or an
    option's name) names a secret.

    Its words (split at ``_``, ``-``, ``.`` and camelCase) decide: a secret word anywhere
    (:data:`_SECRET_WORDS`), or written into one word (:func:`_compound_secret`), unless the
    last word says the value only points at the secret (``token_file``) or measures it
    (``token_count``); a head word (:data:`_SECRET_HEADS`) only as the last word.
    """
    words = [w.lower() for w in _KEY_WORD.findall(key)]
    while words and words[-1].isdigit():  # X-Hub-Signature-256
        words.pop()
    if not words or words[-1] in _POINTER_WORDS or words[-1] in _MEASURE_WORDS:
        return False
    joined = {a + b for a, b in itertools.pairwise(words)}  # api_key -> apikey
    if _SECRET_WORDS.intersection(words) or _SECRET_WORDS.intersection(joined):
        return True
    if any(_compound_secret(w) for w in words):
        return True
    return words[-1] in _SECRET_HEADS and (len(words) == 1 or words[-2] not in _PLAIN_QUALIFIERS)


def _literal(value: str, references: bool) -> bool:
    """Whether a secret's ``value`` is written out (not empty, and with ``references``, not a
    ``${…}`` interpolation whose value comes from elsewhere)."""
    return bool(value) and not (references and "${" in value)


def _mixed(text: str) -> bool:
    """Whether ``text`` mixes two of lowercase letters, uppercase letters and digits."""
    classes = (str.islower, str.isupper, str.isdigit)
    return sum(any(test(c) for c in text) for test in classes) >= 2


def _looks_random(text: str, alphabet: re.Pattern[str]) -> bool:
    """Whether ``text`` is all of ``alphabet`` and holds a run of 16 or more letters and
    digits, both, without a separator (``_``, ``-``, ``+``, ``/``)."""
    if not alphabet.fullmatch(text):
        return False
    run = max(re.split(r"[_\-+/]", text), key=len)
    return len(run) >= 16 and any(c.isdigit() for c in run) and any(c.isalpha() for c in run)


def _random_segment(segment: str) -> bool:
    """Whether a URL path segment looks like a random token (a generic webhook's secret,
    ``/hook/3f9a0c…``, a Mattermost hook id): 20 or more token characters
    (:data:`_TOKEN_SEGMENT`) holding a run of 16 or more letters and digits, both, without a
    separator.

    Names are made of words: ``distilbert-base-uncased-finetuned-sst-2-english`` has no such
    run, and neither has a UUID (runs of at most 12), which in a path names a resource (a run,
    a subscription) far more often than it grants anything; a webhook whose secret is a UUID
    is known by its host (:func:`_known_secret_segments`). What cannot be told from a token is
    masked as one: a commit id or a digest in hex without its algorithm (``secrets.token_hex``
    makes the same).
    """
    return _looks_random(segment, _TOKEN_SEGMENT)


def _random_value(name: str, value: str) -> bool:
    """Whether a query value looks like a random token, whatever its parameter's name
    (``?x=8f3kQ9…``, ``?c=…%3D%3D``): as a path segment does (:func:`_random_segment`), in
    base64 too. A value whose name says it is a digest (:data:`_DIGEST_NAME`) is none."""
    words = [w.lower() for w in _KEY_WORD.findall(name)]
    names = [*words, *(a + b for a, b in itertools.pairwise(words))]  # SHA-256 -> sha256
    if any(_DIGEST_NAME.fullmatch(w) for w in names):
        return False
    return _looks_random(urllib.parse.unquote(value).rstrip("="), _TOKEN_VALUE)


def _known_secret_segments(host: str, segments: list[str]) -> set[int]:
    """Indexes of the ``segments`` of a URL path (``segments[0]`` is empty: the path starts
    with ``/``) that hold a known webhook's secret."""
    found: set[int] = set()
    filled = [i for i, s in enumerate(segments) if s]
    if host in _SLACK_HOSTS and len(filled) >= 4:
        # /services/T…/B…/<secret>, /workflows/T…/A…/<id>/<secret>, /triggers/T…/<id>/<secret>
        found.add(filled[-1])
    elif host in _DISCORD_HOSTS:
        # /api[/v10]/webhooks/<id>/<token>[/slack|/github]
        found.update(i + 2 for i, s in enumerate(segments) if s == "webhooks")
    elif host.endswith(_TEAMS_HOSTS):
        # /webhookb2/<group>@<tenant>/IncomingWebhook/<32 hex>/<owner>[/<V2 key>]
        if "IncomingWebhook" in segments:
            found.update(range(segments.index("IncomingWebhook") + 1, len(segments)))
    elif host == "api.telegram.org":
        # /bot<id>:<token>/sendMessage
        found.update(i for i, s in enumerate(segments) if re.fullmatch(r"bot\d+:.+", s))
    return {i for i in found if i < len(segments) and segments[i]}


def _split_url(url: str) -> tuple[str, str, str, str]:
    """``url`` as ``scheme://`` (empty without a scheme), authority, path and what follows
    (query and fragment)."""
    scheme = _SCHEME.match(url)
    prefix = scheme.group() if scheme else ""
    rest = url[len(prefix) :]
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    authority, path = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    end = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=len(path))
    return prefix, authority, path[:end], path[end:]


def _redact_url_path(url: str, references: bool) -> str:
    """``url`` with the secrets in its path masked, each segment as ``***``: a known
    webhook's secret (:func:`_known_secret_segments`) and, in a URL that is requested, any
    segment that looks random (:func:`_random_segment`). A URL without a scheme counts as
    requested (``example.com/hook/…`` is typed without ``https://``). Scheme, host, query and
    the other segments stay, so that the URL can still be recognised."""
    prefix, authority, path, after = _split_url(url)
    if not path:
        return url
    host = authority.rpartition("@")[2].lower()
    host = host.rpartition(":")[0] if re.search(r":\d*$", host) else host
    segments = path.split("/")
    masked = _known_secret_segments(host, segments)
    requested = not prefix or prefix[:-3].lower() in _REQUESTED_SCHEMES
    if requested and not host.endswith(_SIGNED_QUERY_HOSTS):
        masked.update(i for i, s in enumerate(segments) if _random_segment(s))
    masked = {i for i in masked if _literal(segments[i], references)}
    if not masked:
        return url
    path = "/".join("***" if i in masked else s for i, s in enumerate(segments))
    return f"{prefix}{authority}{path}{after}"


def _redact_url(url: str, references: bool) -> str:
    """One URL found in text with its userinfo (a URL without a scheme: the ``_URL_CREDS``
    pass has masked the others), its path's secrets and its secret or random-looking query
    values masked (punctuation after it, or an interpolation's closing ``}``, is kept out of
    it)."""
    tail = _URL_TAIL.search(url)
    url, tail_text = (url[: tail.start()], tail.group()) if tail else (url, "")
    url = _redact_url_path(url, references)
    prefix, authority, path, after = _split_url(url)
    creds, at, hostport = authority.rpartition("@")
    if not prefix and at and _literal(creds, references):
        authority = f"***@{hostport}"

    def param(m: re.Match[str]) -> str:
        name, value = m.group("name"), m.group("value")
        if not m.group("eq"):  # ?<token>
            name, value = "", name
        # A token that its prefix names keeps the prefix (_redact_tokens): ?q=AIza***.
        random = _random_value(name, value) and _redact_tokens(value) == value
        secret = _secret_key(urllib.parse.unquote_plus(name)) or random
        if not secret or not _literal(value, references):
            return m.group()
        return f"{m.group('sep')}{name}{m.group('eq') or ''}***"

    return prefix + authority + _URL_PARAM.sub(param, path + after) + tail_text


def _redact_tokens(text: str) -> str:
    """``text`` with every token that its prefix names (:data:`_PREFIXED_TOKENS`) and every
    private key in PEM masked."""

    def token(m: re.Match[str]) -> str:
        return f"{m.group('prefix')}***" if _mixed(m.group("body")) else m.group()

    for pattern in _PREFIXED_TOKENS:
        text = pattern.sub(token, text)
    return _PRIVATE_KEY.sub(lambda m: f"{m.group('begin')}***", text)


@functools.lru_cache(maxsize=1024)
def _text_secret_key(name: str) -> bool:
    """Whether ``name``, found in text before a value, names a secret: as a key does
    (:func:`_secret_key`), a lone ``key``, ``pass``, ``session``, ``sig`` or ``signature``
    aside (:data:`_PROSE_HEADS`)."""
    words = _KEY_WORD.findall(name)
    if len(words) == 1 and words[0].lower() in _PROSE_HEADS:
        return False
    return _secret_key(name)


class _ValueEnds:
    """Where the values of the pairs in one text end (:data:`_VALUE_REST`), each scan
    remembered: a pair rejected after its value was followed to its end is searched again
    from its value on, and a value found inside it ends where it does (a value's end depends
    on what follows, not on where it starts), so that no character is scanned twice."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.scanned = {q: (-1, -1) for q in _VALUE_REST}

    def __call__(self, m: re.Match[str]) -> int:
        value, end = m.group("value"), m.end()
        quote = value[0] if value[0] in "\"'" else ""
        if quote and _closed(value):
            return end
        start, stop = self.scanned[quote]
        if start <= end <= stop:
            return stop
        rest = _VALUE_REST[quote].match(self.text, end)  # it matches, empty at least
        stop = rest.end() if rest else end
        self.scanned[quote] = (m.start("value"), stop)
        return stop


def _closed(quoted: str) -> bool:
    """Whether a ``quoted`` value that :data:`_TEXT_PAIR` found ends with its closing quote
    (one not escaped: ``"a\\\\"`` does, ``"a\\"`` does not), and is not cut short."""
    body = quoted[1:-1]
    backslashes = len(body) - len(body.rstrip("\\"))
    return len(quoted) > 1 and quoted[-1] == quoted[0] and backslashes % 2 == 0


def _text_pair(
    text: str, m: re.Match[str], references: bool, value_end: _ValueEnds
) -> tuple[str, int] | None:
    """The pair ``m`` with its value masked and where that value ends (it may run past
    ``m``: :data:`_VALUE_REST`), or ``None`` when it is no secret's."""
    option, value, scheme = m.group("option"), m.group("value"), m.group("auth_scheme")
    quoted = value[0] in "\"'"
    inner = value[1:-1] if quoted else value
    if not _text_secret_key(option or m.group("name")) or not _literal(inner, references):
        return None
    if "***" in inner or inner.lower() in _PROSE_VALUES:
        return None  # masked already (a URL's query, a token's prefix kept), or prose
    end = value_end(m)
    if quoted:
        pass  # a quoted value is one
    elif scheme is not None:
        if len(inner) < 8:
            return None  # Authorization: Bearer <credential>; "basic auth is off" is prose
    elif m.group("sep") not in (None, "=") and not _CLAUSE_END.match(text, end):
        # ``name: value`` and ``name = value`` unquoted are a value only when it ends its
        # clause (``passwd: x``, ``{password: x}``, an INI file's ``password = x``);
        # ``token: cannot be empty`` is a message.
        return None
    if not quoted:
        masked = "***"
    elif _closed(text[m.start("value") : end]):
        masked = f"{value[0]}***{value[0]}"
    else:
        masked = f"{value[0]}***"  # a quoted string that the text cuts off
    return text[m.start() : m.start("value")] + masked, end


def _redact_pairs(text: str, references: bool) -> str:
    """``text`` with the value after every name that names a secret masked
    (:data:`_TEXT_PAIR`). A pair that is none is looked at again from its value on: in
    ``--verbose password=x`` the value of one is the name of the next."""
    if not _SECRET_HINT.search(text):
        return text
    out: list[str] = []
    pos = 0
    value_end = _ValueEnds(text)
    while m := _TEXT_PAIR.search(text, pos):
        pair = _text_pair(text, m, references, value_end)
        if pair is None:
            out.append(text[pos : m.start("value")])
            pos = m.start("value")
        else:
            out.append(text[pos : m.start()] + pair[0])
            pos = pair[1]
    out.append(text[pos:])
    return "".join(out)


def _redact_env_entries(text: str, references: bool) -> str:
    """``text`` with the value of every ``{name: …, value: …}`` entry in it whose name names a
    secret masked (:data:`_ENV_ENTRY`), as :func:`redact` masks the entry as data: a
    Kubernetes ``env`` entry quoted by an error (``{"name": "PGPASSWORD", "value": "***"}``).
    The name stays; so do a ``null`` and a boolean. Unlike :func:`redact`, a third field after
    the two does not make it something else: a text shows too little to tell, and a client's
    repr of an env entry has one (``{'name': …, 'value': …, 'value_from': None}``)."""
    if "{" not in text or not _SECRET_HINT.search(text):
        return text
    out: list[str] = []
    pos = 0
    start = 0
    while m := _ENV_ENTRY.search(text, start):
        fields = {m.group("a").lower(): "a", m.group("b").lower(): "b"}
        start = m.start() + 1  # an entry may start inside a field of a rejected one
        if fields.keys() != {"name", "value"}:
            continue
        name, value = fields["name"], fields["value"]
        shown = m.group(f"{value}v").rstrip()
        quoted = shown[0] in "\"'"
        inner = shown[1:-1] if quoted else shown
        if not quoted and inner.lower() in _ENV_NO_STRING:
            continue
        named = m.group(f"{name}v").rstrip()
        named = named[1:-1] if named[0] in "\"'" else named
        if not _secret_key(named) or not _literal(inner, references):
            continue
        at = m.start(f"{value}v")
        out.append(text[pos:at] + (f"{shown[0]}***{shown[0]}" if quoted else "***"))
        pos = at + len(shown)
        start = max(start, m.end())
    out.append(text[pos:])
    return "".join(out)


def redact_text(text: str, *, references: bool = False) -> str:
    """``text`` with the credentials of every URL in it masked, with its scheme or without:
    userinfo (``redis://:pw@host``, ``redis://:p@ss/w@host`` up to the last '@',
    ``user:pw@redis.internal:6379``), secret query parameters (``?access_token=…``, ``&sig=…``)
    and random-looking query values (``?x=8f3kQ9…``), secrets in the path
    (``hooks.slack.com/services/T…/B…/***``); a Go DSN's credentials
    (``user:pw@tcp(db:3306)/app``); every token its prefix names (``ghp_…``, ``xoxb-…``,
    ``sk-…``, ``AKIA…``), URL or not; and the value after a name that names a secret
    (``password=…``, ``"token": "…"``, ``passwd: …``, ``--token …``; see :data:`_TEXT_PAIR`)
    or in a ``{name: …, value: …}`` entry whose name names one (``{"name": "PGPASSWORD",
    "value": "***"}``; see :data:`_ENV_ENTRY`).

    With ``references`` (unresolved config), a ``${…}`` interpolation is left as it is.
    """
    if "://" in text:

        def creds(m: re.Match[str]) -> str:
            if not _literal(m.group("creds"), references):
                return m.group()
            return f"{m.group('scheme')}***@"

        text = _URL_CREDS.sub(creds, text)
    if "@" in text:
        text = _DSN_CREDS.sub(
            lambda m: "***@" if _literal(m.group(), references) else m.group(), text
        )
    text = _URLS.sub(lambda m: _redact_url(m.group(), references), text)
    # Tokens before pairs: ``token=ghp_***`` keeps the prefix that says which token to rotate.
    return _redact_pairs(_redact_env_entries(_redact_tokens(text), references), references)


def _redact_args(items: list[Any], references: bool) -> list[Any]:
    """An argument list (a ``command`` action's ``argv``) with the values of secret options
    masked: ``--password=…``, ``--token …``, ``db.password=…``."""
    out = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            continue
        if m := _ARG_WITH_VALUE.fullmatch(item):
            name, value = m.group("name"), m.group("value")
            if _secret_key(name) and _literal(value, references):
                out[i] = f"{name}=***"
        elif (m := _ARG_OPTION.fullmatch(item)) and i + 1 < len(items):
            name, value = m.group("name"), items[i + 1]
            flag = name.lower().startswith(("no-", "no_"))  # --no-password takes no value
            if (
                not flag
                and _secret_key(name)
                and isinstance(value, str)
                and not value.startswith("-")
                and _literal(value, references)
            ):
                out[i + 1] = "***"
    return out


def _entry_name(entry: dict[Any, Any]) -> str | None:
    """The name of a ``{name: …, value: …}`` entry, whose value is keyed by its name (a
    Kubernetes container's ``env``, an ECS task's ``environment``: ``{"name": "PGPASSWORD",
    "value": …}``); ``None`` for any other mapping. Exactly these two keys, in any case: a
    mapping with more is something else that happens to have a name."""
    keys = {str(k).lower(): k for k in entry}
    if len(entry) != 2 or keys.keys() != {"name", "value"}:
        return None
    name = entry[keys["name"]]
    return name if isinstance(name, str) else None


def _reference(key: str) -> bool:
    """Whether ``key`` holds a reference to a secret, not one: its last word is ``ref``
    (Kubernetes' ``secretKeyRef`` and ``configMapKeyRef``, cert-manager's
    ``passwordSecretRef``: :data:`_POINTER_WORDS`)."""
    words = _KEY_WORD.findall(key)
    return bool(words) and words[-1].lower() == "ref"


def _entry_key(key: Any, parent: str, secret: bool, named: str | None) -> str:
    """The key that a mapping's ``key`` is redacted under: the parent's below a secret key,
    the entry's name for the value of a ``{name: …, value: …}`` entry (:func:`_entry_name`),
    the reference's for the ``key`` of a reference (``secretKeyRef: {name: db, key:
    password}``: the name of a key in that Secret, no secret itself; a ``key`` elsewhere is
    one), else its own."""
    if secret:
        return parent
    if named is not None and str(key).lower() == "value":
        return named
    if str(key).lower() == "key" and _reference(parent):
        return parent
    return str(key)


def redact(value: Any, key: str = "", *, references: bool = False) -> Any:
    """A copy of config data with secret-looking values replaced by ``'***'``.

    A value is secret when its key names one (``token``, ``password``, ``api_key``,
    ``DB_PASS``, ``X-Signing-Key`` …: :func:`_secret_key`); the credentials in a URL, with
    its scheme or without (``redis://:pw@host``, ``user:pw@redis.internal:6379``,
    ``?access_token=…``, a random-looking query value, a webhook's token in its path:
    :func:`redact_text`), tokens that their prefix names (``ghp_…``, ``sk-…``) and the values
    of secret options in an argument list (``--password=…``) are masked wherever they
    appear; so is the value of a ``{name: …, value: …}`` entry whose name names a secret
    (a Kubernetes ``env`` entry: ``{"name": "PGPASSWORD", "value": …}``). With ``references``
    (unresolved data), a ``${…}`` interpolation is left as it is: it is no secret itself.
    """
    secret = bool(key) and _secret_key(key)
    if isinstance(value, dict):
        # Below a secret key (``credentials: {user: …, key: …}``) everything is secret.
        named = None if secret else _entry_name(value)
        return {
            k: redact(v, _entry_key(k, key, secret, named), references=references)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return _redact_args([redact(v, key, references=references) for v in value], references)
    # A bool is a switch, never a secret (``auth: true``).
    if (
        secret
        and value is not None
        and not isinstance(value, bool)
        and (not isinstance(value, str) or _literal(value, references))
    ):
        return "***"
    if isinstance(value, str):
        return redact_text(value, references=references)
    return value


def shown(value: Any, key: str) -> Any:
    """``value`` as an error about a key the schema does not know may show it: redacted as
    :func:`redact` does, and a bare string that looks like a random token (a misspelt
    ``tokn: 8f3kQ9…``, whose name cannot say it is a secret) masked too."""
    value = redact(value, key)
    if isinstance(value, str) and _looks_random(value, _TOKEN_VALUE):
        return "***"
    return value


def _leaves(data: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts and lists with its config path (``a.b[0].c``)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, data


def secret_paths(data: Any, path: str = "") -> list[str]:
    """Config paths (``a.b[0].c``) of the secrets written literally in ``data``: what
    :func:`redact` masks, ``${…}`` interpolations aside."""
    pairs = zip(_leaves(data, path), _leaves(redact(data, references=True), path), strict=True)
    return [where for (where, given), (_, masked) in pairs if given != masked]


def _secret_in_url_path(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    urls = (_URL_TAIL.sub("", m.group()) for m in _URLS.finditer(value))
    return any(_redact_url_path(url, references=True) != url for url in urls)


def secret_url_paths(data: Any, path: str = "") -> list[str]:
    """Those of :func:`secret_paths` whose value has a URL with a secret written literally in
    its path (a Slack or Discord webhook): the fix is to read the whole URL from the
    environment, ``url: ${oc.env:HOOK_URL}``."""
    return [where for where, value in _leaves(data, path) if _secret_in_url_path(value)]
