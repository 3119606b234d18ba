"""The command line: answers, and one-line errors (no traceback) for bad model files."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest

from hearth.cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("hearth: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_run_answers_paris(capsys):
    # this wording: 'What is the capital of France?' tips the 135M model's first token to 'L'' under int8-activation
    # prefill (what an AVX2 CPU runs), margin 0.31; this one answers Paris in int8, bf16 and the torch path
    code, out, _ = run_cli(capsys, "run", "smollm2", "Name the capital of France.", "--temperature", "0",
                           "--max-tokens", "24")  # fmt: skip
    assert code == 0
    assert "Paris" in out


def test_show_and_list(capsys, smollm2_path):
    code, out, _ = run_cli(capsys, "show", "smollm2", "--json")
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "llama" and info["context_length"] == 8192
    assert info["quantization"]["Q4_1"] == 210 and info["file_size"] > 50_000_000
    code, out, _ = run_cli(capsys, "show", "smollm2", "--load", "--json")
    loaded = json.loads(out)
    # weights stay quantized: packed int4 + the Q8_0 table (and its int8 LM-head form), well under 2x the file
    assert code == 0 and loaded["compute_dtype"] == "bfloat16"
    assert loaded["file_size"] < loaded["memory_used"] < 2 * loaded["file_size"]
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0 and json.loads(out)["local"][0]["name"] == "smollm2"


def test_missing_file(capsys, tmp_path):
    path = str(tmp_path / "nope.gguf")
    assert_one_line_error(*run_cli(capsys, "run", path, "hi")[::2], path, "no such model")


def test_not_a_gguf_file(capsys, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("hello, I am not a model")
    assert_one_line_error(*run_cli(capsys, "run", str(path), "hi")[::2], str(path), "not a GGUF file")


def test_truncated_gguf(capsys, tmp_path, smollm2_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(40_000_000))
    assert_one_line_error(*run_cli(capsys, "run", str(path), "hi")[::2], str(path))


def test_unknown_architecture(capsys, tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    import numpy as np

    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(*run_cli(capsys, "run", str(path), "hi")[::2], str(path), "mamba")


@pytest.mark.parametrize("layout", ["file", "folder"])
def test_pickle_checkpoints_refused(capsys, tmp_path, layout):
    if layout == "file":
        path = tmp_path / "model.bin"
        path.write_bytes(b"\x80\x04pickle")
    else:
        path = tmp_path / "hf-model"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert_one_line_error(*run_cli(capsys, "run", str(path), "hi")[::2], "pickle")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a model")
    proc = subprocess.run([sys.executable, "-m", "hearth", "--debug", "show", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom hearth.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("False"), proc.stdout + proc.stderr


class ScriptedStepEngine:
    """LLMEngine's stepping interface over fixed output pieces, one Delta per step."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = list(pieces)

    def add_request(self, prompt_ids, params, request_id) -> None:
        self.request_id = request_id

    def has_unfinished(self) -> bool:
        return bool(self.pieces)

    def step(self):
        from hearth.engine.protocol import Delta

        piece = self.pieces.pop(0)
        return [Delta(self.request_id, [1], piece, finished=not self.pieces, finish_reason="stop" if not self.pieces
                      else None)]  # fmt: skip

    def abort(self, request_id) -> None:
        self.pieces = []


def test_run_shows_tool_calls_as_labelled_blocks():
    import io

    from hearth.chat.harmony import HarmonyParser
    from hearth.cli.run import stream_answer

    output = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
              'to=functions.get_weather <|constrain|>json<|message|>{"location": "Oslo", "days": [1, 2]}<|call|>')  # fmt: skip
    out = io.StringIO()
    pieces = [output[i : i + 7] for i in range(0, len(output), 7)]
    answer = stream_answer(ScriptedStepEngine(pieces), [1], None, HarmonyParser(), out)
    text = out.getvalue()
    assert text.startswith("Thinking: Need the weather.\n\n")
    block = '[tool call] get_weather\n  {\n    "location": "Oslo",\n    "days": [\n      1,\n      2\n    ]\n  }\n'
    assert block in text and answer == ""
    out = io.StringIO()
    stream_answer(ScriptedStepEngine(["<|channel|>final<|message|>", "{not json"]), [1], None, HarmonyParser(), out)
    assert out.getvalue() == "{not json\n"
    from hearth.chat.tool_calls import ToolCall
    from hearth.cli.run import tool_call_text

    assert tool_call_text(ToolCall("f", "{bad")) == "\n[tool call] f\n  {bad\n"  # arguments that are not JSON: as sent
