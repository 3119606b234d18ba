"""`hearth pull` / `list` / `rm` and hub references: pulls run as subprocesses against a local fake hub (HF_ENDPOINT)
into a temporary HF cache; the pulled models, an Ollama store and an LM Studio folder then run offline."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from fake_hub import FakeHub
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = "test-org/tiny-llama"
GGUF = "test-org/tiny-GGUF"
GATED = "test-org/gated-llama"
BIG = "test-org/big-GGUF"


def fake_gguf(tag: str, n: int = 4096) -> bytes:
    return b"GGUF" + hashlib.sha256(tag.encode()).digest() * (n // 32)


@pytest.fixture(scope="module")
def hub(tiny_llama3):
    folder, _ = tiny_llama3
    files = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            files[name] = f.read()
    assert "model.safetensors" in files and "config.json" in files
    tok_config = json.loads(files["tokenizer_config.json"])  # `hearth run` chats: give the byte tokenizer a template
    tok_config["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    files["tokenizer_config.json"] = json.dumps(tok_config).encode()
    llama = {**files, "pytorch_model.bin": b"\x80\x04pickle", "original/model.safetensors": files["model.safetensors"],
             "README.md": b"# tiny llama\n"}  # fmt: skip
    gguf = {f"tiny-{t}.gguf": fake_gguf(t) for t in ("Q4_K_M", "Q8_0")}
    gguf.update({f"tiny-Q2_K-0000{i}-of-00002.gguf": fake_gguf(f"Q2_K{i}") for i in (1, 2)})
    gguf.update({"README.md": b"# gguf\n", "model.bin": b"\x80\x04pickle"})
    server = FakeHub()
    server.add_repo(LLAMA, llama)
    server.add_repo(GGUF, gguf)
    server.add_repo(GATED, files)
    server.gated[GATED] = "hf_secret_token_123"
    server.add_repo("test-org/huge-GGUF", {"huge-Q4_0.gguf": fake_gguf("huge")})
    server.listed_size[("test-org/huge-GGUF", "huge-Q4_0.gguf")] = 10**16
    server.add_repo(BIG, {"big-Q4_0.gguf": b"GGUF" + os.urandom(24 << 20)})  # over huggingface_hub's 10 MiB chunks
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh HF cache; this process reads it through HF_HUB_CACHE."""
    path = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    return path


def pull(hub, cache, *args, token=None, endpoint=None):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=endpoint or hub.url, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf-home"),
               PYTHONPATH=ROOT, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")  # fmt: skip
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "hearth", "pull", *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=180, cwd=ROOT)  # fmt: skip


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("hearth: error:")]


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot_files(cache, repo: str) -> list[str]:
    snaps = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return sorted(str(p.relative_to(d)) for d in snaps.iterdir() for p in d.rglob("*") if p.is_file())


def test_dropped_transfer_resumes(hub, cache):
    hub.drop_once.add((BIG, "big-Q4_0.gguf"))
    proc = pull(hub, cache, BIG)
    assert proc.returncode == 0, proc.stderr
    # the second request asks for the rest only: from the last whole chunk written before the drop
    ranges = [r for m, p, r in hub.log if m == "GET" and p.startswith(f"/{BIG}/")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= len(hub.repos[BIG]["big-Q4_0.gguf"]) // 2
    path = cache / f"models--{BIG.replace('/', '--')}" / "snapshots" / hub.commits[BIG] / "big-Q4_0.gguf"
    assert path.read_bytes() == hub.repos[BIG]["big-Q4_0.gguf"]


def test_pull_safetensors_repo_and_run_it_offline(hub, cache, capsys, monkeypatch):
    proc = pull(hub, cache, LLAMA)
    assert proc.returncode == 0, proc.stderr
    assert "fits" in proc.stdout and "skipping 1 pickle" in proc.stdout
    size = len(hub.repos[LLAMA]["model.safetensors"])
    # only what the model needs: no pickle, no original/ copy, no README
    fetched = set(hub.requests_for(LLAMA))
    assert "pytorch_model.bin" not in fetched and "original/model.safetensors" not in fetched
    assert snapshot_files(cache, LLAMA) == sorted(["config.json", "generation_config.json", "model.safetensors",
                                                    "tokenizer.json", "tokenizer_config.json"])  # fmt: skip
    # the standard cache layout: transformers finds it without network
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(LLAMA, cache_dir=str(cache), local_files_only=True)
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    # Hearth runs it by repo id, offline (the run installs the guard)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # reachable, yet never asked: resolution reads the cache only
    requests = len(hub.log)
    code = main(["run", LLAMA, "hi", "--max-tokens", "4", "--temperature", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(hub.log) == requests
    code = main(["show", LLAMA, "--json"])
    info = json.loads(capsys.readouterr().out)
    assert code == 0 and info["model"] == LLAMA and info["architecture"] == "LlamaForCausalLM"
    # `hearth list` shows it; `hearth rm` removes it (after confirmation)
    assert main(["list", "--json"]) == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)["local"]}
    assert rows[LLAMA]["format"] == "safetensors" and rows[LLAMA]["kind"] == "hf-cache" and rows[LLAMA]["size"] > size
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["rm", LLAMA]) == 1
    assert "--yes" in capsys.readouterr().err and (cache / f"models--{LLAMA.replace('/', '--')}").exists()
    assert main(["rm", LLAMA, "--yes"]) == 0
    assert not (cache / f"models--{LLAMA.replace('/', '--')}").exists()
    assert main(["run", LLAMA, "hi"]) == 1
    assert "hearth pull" in capsys.readouterr().err


def test_pull_again_is_a_no_op_and_revision_pins(hub, cache):
    commit = hub.commits[LLAMA]
    assert pull(hub, cache, LLAMA, "--revision", commit).returncode == 0
    before = len(hub.requests_for(LLAMA))
    proc = pull(hub, cache, LLAMA, "--revision", commit)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.requests_for(LLAMA)) == before  # cached files are checked on disk, not fetched again
    assert (cache / f"models--{LLAMA.replace('/', '--')}" / "snapshots" / commit / "config.json").is_file()
    assert not (cache / f"models--{LLAMA.replace('/', '--')}" / "refs" / "main").exists()  # pinned: no branch moved
    from hearth.loader.resolve import resolve_model

    assert resolve_model(LLAMA).path.endswith(commit)  # the only snapshot, found without refs/main
    assert_one_line_error(pull(hub, cache, LLAMA, "--revision", "v9"), "no revision 'v9'")


@pytest.mark.parametrize(("tag", "expected"), [
    ("Q8_0", ["tiny-Q8_0.gguf"]), ("q4_k_m", ["tiny-Q4_K_M.gguf"]), (None, ["tiny-Q4_K_M.gguf"]),
    ("Q2_K", ["tiny-Q2_K-00001-of-00002.gguf", "tiny-Q2_K-00002-of-00002.gguf"]),
])  # fmt: skip
def test_pull_gguf_quant_tag(hub, cache, tag, expected, capsys):
    proc = pull(hub, cache, f"{GGUF}:{tag}" if tag else GGUF)
    assert proc.returncode == 0, proc.stderr
    assert snapshot_files(cache, GGUF) == expected
    assert "model.bin" not in hub.requests_for(GGUF)
    assert main(["list", "--json"]) == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)["local"]}
    listed = f"{GGUF}:{(tag or 'Q4_K_M').upper()}"
    assert rows[listed]["size"] == sum(len(hub.repos[GGUF][f]) for f in expected)
    assert rows[listed]["format"] == ("gguf (2 parts)" if len(expected) == 2 else "gguf")
    if len(expected) == 2:  # resolves to the first part, from which the loader opens them all
        from hearth.loader.resolve import resolve_model

        found = resolve_model(f"{GGUF}:{tag}")
        assert found.format == "gguf" and found.path.endswith("tiny-Q2_K-00001-of-00002.gguf")


def test_unknown_tag_lists_the_available_ones(hub, cache):
    assert_one_line_error(pull(hub, cache, f"{GGUF}:Q5_K_M"), "Q5_K_M", "available: Q2_K, Q4_K_M, Q8_0")


def test_include_glob_and_pickles_never(hub, cache):
    proc = pull(hub, cache, LLAMA, "--include", "*.json", "*.bin")
    assert proc.returncode == 0, proc.stderr
    assert snapshot_files(cache, LLAMA) == ["config.json", "generation_config.json", "tokenizer.json",
                                            "tokenizer_config.json"]  # fmt: skip
    assert not any(p.endswith(".bin") for p in hub.requests_for(LLAMA, "GET") + hub.requests_for(LLAMA, "HEAD"))


def test_tampered_file_is_fetched_again_then_refused(hub, cache):
    hub.tamper[(GGUF, "tiny-Q8_0.gguf")] = 1  # corrupted once: deleted, fetched again, fine
    proc = pull(hub, cache, f"{GGUF}:Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert "mismatch" in proc.stderr
    path = cache / f"models--{GGUF.replace('/', '--')}" / "snapshots" / hub.commits[GGUF] / "tiny-Q8_0.gguf"
    assert path.read_bytes() == hub.repos[GGUF]["tiny-Q8_0.gguf"]
    hub.tamper[(GGUF, "tiny-Q4_K_M.gguf")] = 2  # corrupted every time: an error, and nothing left in the cache
    proc = pull(hub, cache, f"{GGUF}:Q4_K_M")
    assert_one_line_error(proc, "corrupted download", "tiny-Q4_K_M.gguf")
    blob = hashlib.sha256(hub.repos[GGUF]["tiny-Q4_K_M.gguf"]).hexdigest()
    assert not (cache / f"models--{GGUF.replace('/', '--')}" / "blobs" / blob).exists()
    assert "tiny-Q4_K_M.gguf" not in snapshot_files(cache, GGUF)


def test_one_line_errors(hub, cache):
    assert_one_line_error(pull(hub, cache, "test-org/nope"), "no such repo", "test-org/nope")
    assert_one_line_error(pull(hub, cache, LLAMA, endpoint="http://127.0.0.1:1"), "cannot reach http://127.0.0.1:1")
    assert_one_line_error(pull(hub, cache, LLAMA, endpoint="http://hub.invalid"), "cannot reach http://hub.invalid")
    line = assert_one_line_error(pull(hub, cache, "test-org/huge-GGUF"), "not enough disk space")
    assert not hub.requests_for("test-org/huge-GGUF")  # refused before any download
    assert "GB" in line
    assert_one_line_error(pull(hub, cache, "not a repo"), "not a repo id")


def test_gated_repo_needs_a_token_and_never_prints_it(hub, cache):
    assert_one_line_error(pull(hub, cache, GATED), "gated", "HF_TOKEN")  # refused from the listing
    proc = pull(hub, cache, GATED, token="hf_wrong_token_456")  # listed, then the files are refused
    assert_one_line_error(proc, "gated")
    assert "hf_wrong_token_456" not in proc.stdout + proc.stderr
    token = hub.gated[GATED]
    proc = pull(hub, cache, GATED, token=token)
    assert proc.returncode == 0, proc.stderr
    assert token not in proc.stdout + proc.stderr


def test_fit_refusal_without_a_terminal(monkeypatch, capsys):
    from hearth.cli.main import CliError
    from hearth.cli.pull import confirm

    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(CliError, match="--yes"):
        confirm("Download anyway?", False, "pull: does not fit; pass --yes")
    assert confirm("Download anyway?", True, "unused")


def test_fit_report_uses_the_card(monkeypatch):
    from hearth.loader import hub as hubmod
    from hearth.planner.hardware import CATALOGUE

    monkeypatch.setattr("hearth.planner.hardware.get_hardware", lambda name="auto", devices=1: CATALOGUE["h100"])
    plan = hubmod.PullPlan(
        hubmod.parse_hub_ref("gpt-oss:120b"),
        "0" * 40,
        [hubmod.RemoteFile("model-00000-of-00014.safetensors", 65 * 10**9, None, None)],
        0,
        "",
    )
    fits, lines = hubmod.fit_report(plan)
    assert fits is True and "fits" in lines[0]
    plan.ref = hubmod.parse_hub_ref("deepseek-v3")
    plan.files = [hubmod.RemoteFile("model-00001-of-000163.safetensors", 688 * 10**9, None, None)]
    fits, lines = hubmod.fit_report(plan)
    assert fits is False and "does NOT fit" in lines[0]


@pytest.mark.parametrize(("names", "tag", "expected"), [
    (["a-Q4_K_M.gguf", "a-q8_0.gguf"], "Q8_0", ["a-q8_0.gguf"]),
    (["Q4_K_M/a-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_S.gguf"], "q4_k_m",
     ["Q4_K_M/a-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/a-Q4_K_M-00002-of-00002.gguf"]),
    (["a-Q4_K_M.gguf", "a-IQ4_K_M.gguf", "mmproj-a-Q4_K_M.gguf"], "Q4_K_M", ["a-Q4_K_M.gguf"]),
    (["a.Q4_0.gguf", "a.Q4_1.gguf"], "Q4_1", ["a.Q4_1.gguf"]),
    (["a-Q8_0.gguf"], "Q4_0", []),
])  # fmt: skip
def test_match_quant(names, tag, expected):
    from hearth.loader.hub import match_quant

    assert match_quant(names, tag) == expected


def test_parse_refs():
    from hearth.loader.hub import SHORT_NAMES, parse_hub_ref
    from hearth.planner.cards import load_card

    assert parse_hub_ref("openai/gpt-oss-20b").repo == "openai/gpt-oss-20b"
    r = parse_hub_ref("ggml-org/gpt-oss-20b-GGUF:Q4_K_M")
    assert (r.repo, r.tag) == ("ggml-org/gpt-oss-20b-GGUF", "Q4_K_M")
    assert parse_hub_ref("GPT-OSS:20B").repo == "openai/gpt-oss-20b"
    for bad in ("model.gguf", "/abs/path", "./rel", "a/b/c", "smollm2", "a/../b", "owner/name:bad tag"):
        assert parse_hub_ref(bad) is None, bad
    for name, short in SHORT_NAMES.items():  # every short name has its planner card
        assert load_card(short.card) is not None, name


@pytest.fixture
def stores(tmp_path, monkeypatch, smollm2_path):
    """An Ollama store and an LM Studio folder holding the embedded SmolLM2 GGUF (symlinked)."""
    from hearth.loader.hub import file_digest

    digest = file_digest(smollm2_path, "sha256")
    ollama = tmp_path / "ollama-models"
    (ollama / "blobs").mkdir(parents=True)
    (ollama / "blobs" / f"sha256-{digest}").symlink_to(smollm2_path)
    manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "smol" / "135m"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
         "size": os.path.getsize(smollm2_path)},
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10}]}))  # fmt: skip
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    home = tmp_path / "home"
    lms = home / ".lmstudio" / "models" / "lmstudio-community" / "SmolLM2-135M-Instruct-GGUF"
    lms.mkdir(parents=True)
    (lms / "SmolLM2-135M-Instruct-Q4_1.gguf").symlink_to(smollm2_path)
    # LM Studio's folders are under ~; the compiled-kernel cache stays where it is
    monkeypatch.setenv("XDG_CACHE_HOME", os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return os.path.getsize(smollm2_path)


def test_list_and_run_ollama_and_lmstudio_models(stores, capsys, smollm2_path):
    assert main(["list", "--json"]) == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)["local"]}
    assert rows["ollama:smol:135m"]["size"] == stores and rows["ollama:smol:135m"]["format"] == "gguf"
    lms = "lmstudio:lmstudio-community/SmolLM2-135M-Instruct-GGUF"
    assert rows[lms]["size"] == stores and rows[lms]["kind"] == "lmstudio"
    assert main(["list"]) == 0
    assert "ollama:smol:135m" in capsys.readouterr().out
    from hearth.loader.resolve import resolve_model

    for ref, source in [("ollama:smol:135m", "ollama"), ("smol:135m", "ollama"), (lms, "lmstudio"),
                        ("lmstudio-community/SmolLM2-135M-Instruct-GGUF:q4_1", "lmstudio")]:  # fmt: skip
        model = resolve_model(ref)
        assert model.format == "gguf" and model.source == source and model.name == ref
        assert os.path.realpath(model.path) == os.path.realpath(smollm2_path)
    # the Ollama name runs the very file: greedy output equal to the file's own (the words themselves depend on the
    # arithmetic the CPU gets: int8 or bf16 prefill tips this 135M model's first token between 'The' and 'L'')
    question = ["What is the capital of France?", "--temperature", "0", "--max-tokens", "16"]
    assert main(["run", smollm2_path, *question]) == 0
    direct = capsys.readouterr().out
    assert main(["run", "ollama:smol:135m", *question]) == 0
    assert capsys.readouterr().out == direct and len(direct.split()) >= 3
    # LM Studio's file goes through the same resolution; `show` reads it without a second (slow) load
    assert main(["show", lms, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == lms and info["architecture"] == "llama" and info["file_size"] == stores
    assert main(["run", "ollama:nope:1b", "hi"]) == 1
    assert "Ollama has no such model" in capsys.readouterr().err
    assert main(["rm", "ollama:smol:135m", "--yes"]) == 1
    assert "ollama rm" in capsys.readouterr().err


QUANTS = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_XS", "F16", "BF16"]


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(QUANTS), st.integers(1, 4), min_size=1),  # tag -> number of parts
    st.sampled_from(["Model-7B", "gpt-oss-20b", "r1.distill"]),
    st.sampled_from(["-", "."]),
    st.data(),
)
def test_quant_selection_picks_exactly_the_tag(parts, stem, sep, data):
    """Every file (or every split part) of the chosen tag, nothing of another tag, pickles never; a missing tag names
    the ones there."""
    from hearth.loader.hub import HubError, select_files

    names = ["README.md", "config.json", "model.bin", "mmproj-F16.gguf"]
    expected = {}
    for tag, n in parts.items():
        files = [f"{stem}{sep}{tag}.gguf"] if n == 1 else [f"{stem}{sep}{tag}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
        expected[tag] = files
        names += files
    tag = data.draw(st.sampled_from(sorted(parts)))
    casing = data.draw(st.sampled_from([str.upper, str.lower]))
    assert select_files(names, casing(tag)) == sorted(expected[tag])
    with pytest.raises(HubError, match="available: " + re.escape(", ".join(sorted(parts)))):
        select_files(names, "Q7_X")


def test_pull_talks_to_the_endpoint_hosts_only(hub, cache):
    """A redirect to the endpoint's own host (its CDN path) is followed; one to any other host is refused in one line
    before it connects, and nothing is written."""
    from urllib.parse import urlsplit

    port = urlsplit(hub.url).port
    key = (GGUF, "tiny-Q8_0.gguf")
    try:
        hub.redirect[key] = f"http://localhost:{port}"  # the same server under another name: refused all the same
        line = assert_one_line_error(pull(hub, cache, f"{GGUF}:Q8_0"), "refusing a request to localhost", hub.url)
        assert "HF_ENDPOINT" in line
        assert not any(p.startswith("/cdn/") for _, p, _ in hub.log)
        blobs = cache / f"models--{GGUF.replace('/', '--')}" / "blobs"
        assert not blobs.exists() or not [p for p in blobs.iterdir() if p.stat().st_size > 0]
        hub.redirect[key] = hub.url  # the endpoint's own host: followed, and the file checks out
        proc = pull(hub, cache, f"{GGUF}:Q8_0")
        assert proc.returncode == 0, proc.stderr
        assert f"/cdn/{GGUF}/tiny-Q8_0.gguf" in [p for m, p, _ in hub.log if m == "GET"]
        assert snapshot_files(cache, GGUF) == ["tiny-Q8_0.gguf"]
    finally:
        hub.redirect.pop(key, None)


def test_endpoint_allows():
    from hearth.loader.hub import endpoint_allows

    hub = "https://huggingface.co"
    for url in ["https://huggingface.co/api/models/x", "https://cdn-lfs.huggingface.co/x", "https://cas-bridge.xethub.hf.co/x",
                "https://hf.co/x"]:  # fmt: skip
        assert endpoint_allows(url, hub), url
    for url in ["https://evil.com/x", "https://huggingface.co.evil.com/x", "https://xhf.co/x", "http:///x"]:
        assert not endpoint_allows(url, hub), url
    mirror = "http://mirror.example.org:8080"
    assert endpoint_allows("http://mirror.example.org:9000/x", mirror)
    assert endpoint_allows("https://cdn.mirror.example.org/x", mirror)
    assert not endpoint_allows("https://cdn-lfs.huggingface.co/x", mirror)
    assert not endpoint_allows("http://localhost:8080/x", "http://127.0.0.1:8080")
