"""Sample formats: exact layouts (literal strings) and ids equal to the real Qwen tokenizer's; loss masks."""
import numpy as np
import pytest

from qcjax import prompts
from qcjax.data import formats as F
from test_data_common import qwen_tok, ref_ids, tiny_spm

PRE, MID, SUF = "def area(r):\n    ", "return 3.14159 * r ** 2", "\n\nprint(area(2))\n"


def ids(parts):
    return F.encode_parts(qwen_tok(), parts)


def masked_text(doc: F.Doc) -> str:
    return qwen_tok().decode(doc.tokens[doc.loss_mask == 1])


def test_plain_document():
    doc = ids(F.plain_parts(PRE + MID))
    assert doc.tokens.tolist() == ref_ids(PRE + MID + "<|endoftext|>")
    assert doc.tokens.dtype == np.int32 and doc.loss_mask.dtype == np.float32 and doc.loss_mask.all()


def test_fim_psm_layout_and_ids():
    parts = F.fim_parts(PRE, MID, SUF)
    s = f"<|fim_prefix|>{PRE}<|fim_suffix|>{SUF}<|fim_middle|>{MID}<|endoftext|>"
    assert F.render(parts) == s
    assert ids(parts).tokens.tolist() == ref_ids(s) and ids(parts).loss_mask.all()


def test_fim_spm_layout_and_ids():
    parts = F.fim_parts(PRE, MID, SUF, spm=True)
    s = f"<|fim_prefix|><|fim_suffix|>{SUF}<|fim_middle|>{PRE}{MID}<|endoftext|>"
    assert F.render(parts) == s
    assert ids(parts).tokens.tolist() == ref_ids(s)


def test_fim_split_points_char_and_line():
    text = "a = 1\nbb = 2\nccc = 3\n"
    rng = np.random.default_rng(0)
    line_starts = {0, 6, 13, len(text)}
    for _ in range(50):
        i, j = F.fim_split_points(text, rng, "char")
        assert 0 <= i <= j <= len(text)
        i, j = F.fim_split_points(text, rng, "line")
        assert i <= j and {i, j} <= line_starts


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_fim_rate_is_the_fraction_of_documents_transformed(rate):
    rng = np.random.default_rng(1)
    n = 400
    fim = sum(isinstance(F.document_parts("x = 1\n", rng, rate)[0], F.Special) for _ in range(n))
    assert abs(fim / n - rate) < 0.08


def test_every_document_ends_with_endoftext():
    rng = np.random.default_rng(2)
    for _ in range(20):
        assert F.render(F.document_parts(PRE + MID + SUF, rng, 0.5, 0.5)).endswith("<|endoftext|>")


FILES = [("pkg/b.py", "from pkg import a\nprint(a.X)\n"), ("pkg/a.py", "X = 1")]


def test_repo_layout_and_ids():
    docs, dropped = F.repo_docs(qwen_tok(), "me/proj", FILES, None, np.random.default_rng(0), fim_rate=0.0)
    s = ("<|repo_name|>me/proj\n<|file_sep|>pkg/a.py\nX = 1\n<|file_sep|>pkg/b.py\nfrom pkg import a\nprint(a.X)\n\n"
         "<|endoftext|>")
    assert dropped == 0 and len(docs) == 1 and docs[0].tokens.tolist() == ref_ids(s)
    assert F.render(F.repo_parts("me/proj", sorted(FILES))) == s


def test_repo_layout_equals_qwens_worked_example():
    """QwenLM/Qwen2.5-Coder examples/Qwen2.5-Coder.md, "Repository Level Code Infilling", written out by hand with
    the file bodies shortened: every earlier file's content is followed by a newline, so a file that ends in one is
    followed by a blank line before the next <|file_sep|>; the current file goes straight into FIM after its path."""
    library = "class Library:\n    def __init__(self):\n        self.books = []\n"
    student = "class Student:\n    def __init__(self, name, id):\n        self.name = name\n"
    pre, suf = "from library import Library\n\ndef main():\n    # Student borrows a book", "\n    print(book)"
    official = ("<|repo_name|>library-system\n"
                "<|file_sep|>library.py\n"
                "class Library:\n    def __init__(self):\n        self.books = []\n"
                "\n"
                "<|file_sep|>student.py\n"
                "class Student:\n    def __init__(self, name, id):\n        self.name = name\n"
                "\n"
                "<|file_sep|>main.py\n"
                "<|fim_prefix|>from library import Library\n\ndef main():\n    # Student borrows a book"
                "<|fim_suffix|>\n    print(book)<|fim_middle|>")
    files = [("library.py", library), ("student.py", student)]
    assert F.render(prompts.repo_prompt("library-system", files, "main.py", pre, suf)) == official
    training = F.render(F.repo_parts("library-system", files))
    assert training == official[: official.index("<|file_sep|>main.py")] + "<|endoftext|>"


def test_repo_last_file_in_fim_form():
    rng = np.random.default_rng(3)
    docs, _ = F.repo_docs(qwen_tok(), "r", FILES, None, rng, fim_rate=1.0)
    text = qwen_tok().decode(docs[0].tokens)
    head = "<|repo_name|>r\n<|file_sep|>pkg/a.py\nX = 1\n<|file_sep|>pkg/b.py\n<|fim_prefix|>"
    assert text.startswith(head) and text.endswith("<|endoftext|>")
    pre, rest = text[len(head):].split("<|fim_suffix|>")
    suf, mid = rest[:-len("<|endoftext|>")].split("<|fim_middle|>")
    assert pre + mid + suf == FILES[0][1]
    assert docs[0].tokens.tolist() == ref_ids(text)


def test_repo_budget_split_and_cut():
    tok = qwen_tok()
    files = [(f"f{i}.py", f"value_{i} = {i}\n" * 6) for i in range(6)]
    docs, _ = F.repo_docs(tok, "r", files, 60, np.random.default_rng(0), fim_rate=0.0, overflow="split")
    assert len(docs) > 1 and all(len(d.tokens) <= 60 for d in docs)
    texts = [tok.decode(d.tokens) for d in docs]
    assert all(t.startswith("<|repo_name|>r\n<|file_sep|>") and t.endswith("<|endoftext|>") for t in texts)
    assert sum(t.count("<|file_sep|>") for t in texts) == 6  # every file once
    cut, dropped = F.repo_docs(tok, "r", files, 60, np.random.default_rng(0), fim_rate=0.0, overflow="cut")
    assert len(cut) == 1 and dropped == 6 - texts[0].count("<|file_sep|>")


def test_repo_file_orders():
    files = [("z.py", "import m\n"), ("m.py", "from . import a\nimport os\n"), ("a.py", "x = 1\n")]
    assert [p for p, _ in F.order_files(files, "deps")] == ["a.py", "m.py", "z.py"]
    assert [p for p, _ in F.order_files(files, "path")] == ["a.py", "m.py", "z.py"]
    assert F.order_files(files, "given") == files
    r1 = F.order_files(files, "random", np.random.default_rng(5))
    assert r1 == F.order_files(files, "random", np.random.default_rng(5)) and sorted(r1) == sorted(files)
    cyc = [("b.py", "import a\n"), ("a.py", "import b\n")]
    assert sorted(F.order_files(cyc, "deps")) == sorted(cyc)  # cycles do not lose files


CHAT = [{"role": "user", "content": "Write add."}, {"role": "assistant", "content": "def add(a, b):\n    return a+b"},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome."}]


def test_chatml_layout_ids_and_assistant_only_mask():
    doc = ids(F.chat_parts(CHAT, system="Be brief."))
    s = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWrite add.<|im_end|>\n<|im_start|>assistant\n"
         "def add(a, b):\n    return a+b<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n"
         "You're welcome.<|im_end|>\n")
    assert doc.tokens.tolist() == ref_ids(s)
    assert masked_text(doc) == "def add(a, b):\n    return a+b<|im_end|>You're welcome.<|im_end|>"


def test_chat_keeps_existing_system_turn_and_straddling_tokens_train():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "\n\nindented"}]
    doc = ids(F.chat_parts(msgs, system="ignored"))
    assert "ignored" not in qwen_tok().decode(doc.tokens)
    assert masked_text(doc).endswith("\n\nindented<|im_end|>")  # a token spanning "assistant\n" + "\n\n" counts


def test_fim_instruct_trains_only_the_middle():
    doc = ids(F.fim_parts(PRE, MID, SUF, instruct=True))
    assert doc.tokens.tolist() == ref_ids(f"<|fim_prefix|>{PRE}<|fim_suffix|>{SUF}<|fim_middle|>{MID}<|endoftext|>")
    assert masked_text(doc) == MID + "<|endoftext|>"


@pytest.mark.parametrize("style", ["chatml", "raw"])
def test_dpo_masks_only_the_completion(style):
    doc = ids(F.dpo_parts("Sum 2+2?", " It is 4.", style))
    if style == "raw":
        assert doc.tokens.tolist() == ref_ids("Sum 2+2? It is 4.<|endoftext|>")
        assert masked_text(doc) == " It is 4.<|endoftext|>"
    else:
        s = "<|im_start|>user\nSum 2+2?<|im_end|>\n<|im_start|>assistant\n It is 4.<|im_end|>\n"
        assert doc.tokens.tolist() == ref_ids(s)
        assert masked_text(doc) == " It is 4.<|im_end|>"


def test_dpo_message_prompt_trains_only_the_last_turn():
    doc = ids(F.dpo_parts(CHAT[:3], "Sure.", "chatml"))
    assert masked_text(doc) == "Sure.<|im_end|>"


def test_spm_backend_formats_match_its_own_special_parsing():
    sp = tiny_spm()
    for parts in (F.fim_parts(PRE, MID, SUF), F.chat_parts(CHAT), F.plain_parts(PRE)):
        doc = F.encode_parts(sp, parts)
        assert doc.tokens.tolist() == sp.encode_with_special(F.render(parts))


def test_split_and_truncate_docs():
    doc = F.Doc(np.arange(10, dtype=np.int32), np.ones(10, np.float32))
    pieces = F.split_doc(doc, 4)
    assert [len(p.tokens) for p in pieces] == [4, 4, 2]
    assert np.concatenate([p.tokens for p in pieces]).tolist() == list(range(10))
    assert F.truncate_doc(doc, 3).tokens.tolist() == [0, 1, 2]
