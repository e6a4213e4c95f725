#!/usr/bin/env python3
"""The official `openai` package against berth's gateway, one scenario per run.

Run by tests/tests/gateway.rs, which starts the fleet and says what to expect through the
environment: BASE_URL (the gateway's /v1), API_KEY, MODEL, and per scenario more. Exits
non-zero with the reason when something is not as expected.
"""

import os
import sys
import time

import openai

BASE_URL = os.environ["BASE_URL"]
API_KEY = os.environ.get("API_KEY", "none")
MODEL = os.environ.get("MODEL", "")


def client(key=API_KEY):
    # No retries of its own: what the test sees is what the gateway did.
    return openai.OpenAI(base_url=BASE_URL, api_key=key, max_retries=0, timeout=60)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def serves():
    """Models list, chat (plain and streamed, passed through as it comes), completions and
    embeddings on the model MODEL."""
    c = client()
    ids = [m.id for m in c.models.list().data]
    check(MODEL in ids, f"/v1/models lists {MODEL!r}: {ids}")

    chat = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)
    instance = chat.headers.get("x-berth-instance")
    reply = chat.parse()
    text = reply.choices[0].message.content
    check(bool(text), f"a chat completion answers: {text!r} (instance {instance})")
    check(reply.usage.completion_tokens > 0, "with its token count")
    expected = os.environ.get("INSTANCES")
    if expected:
        check(instance in expected.split(","), f"served by one of {expected}: {instance}")

    hold = os.environ.get("HOLD_FILE")
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count."}], max_tokens=16,
        stream=True)
    parts = []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.content or ""
        parts.append(delta)
        if hold and delta.strip() and not os.path.exists(hold):
            # The server holds the rest of its reply until this file exists: a proxy that
            # buffered would never have let this first token through.
            open(hold, "w").close()
            print("ok: the first token came through before the server sent the rest")
    streamed = "".join(parts)
    check("hold timed out" not in streamed, f"the stream was not held up: {streamed!r}")
    check(len([p for p in parts if p]) > 1, f"a streamed reply comes in chunks: {parts!r}")
    if hold:
        check(os.path.exists(hold), "the hold was released by the first token")

    if os.environ.get("FAKE"):
        comp = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
        check(bool(comp.choices[0].text), f"a completion answers: {comp.choices[0].text!r}")
        emb = c.embeddings.create(model=MODEL, input=["a", "b"])
        check(len(emb.data) == 2 and len(emb.data[0].embedding) > 0, "embeddings answer")


def missing():
    """A model nobody started: 404, with what is served."""
    try:
        client().chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    except openai.NotFoundError as e:
        check(e.status_code == 404, "404 for a model nobody started")
        check("no-such-model" in str(e) and MODEL in str(e),
              f"the error names the model and what is served: {e}")
        return
    check(False, "a request for a model nobody started was answered")


def unready():
    """A model with no running instance: 503 with berth's reason."""
    want = os.environ["REASON"]
    try:
        client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as e:
        check(e.status_code == 503, f"503 for a model with no running instance: {e.status_code}")
        check(want in str(e), f"the error says why ({want!r}): {e}")
        return
    check(False, "a request for a model with no running instance was answered")


def unauthorized():
    """A key that is not one, a well-formed unknown key: 401 and nothing else said."""
    for key in ["not-a-key", "berth_" + "0" * 64]:
        try:
            client(key).models.list()
        except openai.AuthenticationError as e:
            check(e.status_code == 401, f"401 for key {key[:8]!r}")
            check("berth_" not in str(e), "without detail")
            continue
        check(False, f"key {key[:8]!r} was let in")


def retried():
    """Every request is answered although one instance's server is gone: the gateway tries
    another one. All answers come from EXPECT."""
    want = os.environ["EXPECT"]
    c = client()
    for i in range(int(os.environ.get("COUNT", "8"))):
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=4)
        check(raw.status_code == 200, f"request {i} answered")
        check(raw.headers.get("x-berth-instance") == want,
              f"request {i} served by {want}: {raw.headers.get('x-berth-instance')}")


SCENARIOS = {f.__name__: f for f in [serves, missing, unready, unauthorized, retried]}

if __name__ == "__main__":
    t0 = time.monotonic()
    for name in sys.argv[1:]:
        SCENARIOS[name]()
    print(f"done in {time.monotonic() - t0:.2f} s")
