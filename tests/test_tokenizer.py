import json
import shutil

import pytest
import sentencepiece
import tokenizers
from hypothesis import given, settings, strategies as st

from conftest import STORIES, shared
from tokenizer import StreamDecoder, Tokenizer, TokenizerError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, Ærøskøbing, Đà Nẵng",
    "日本語のテキスト、中文字符，한국어",
    "emoji 😀 👍🏽 🇫🇷 👨‍👩‍👧 end",
    "  leading, two  spaces,\ttabs\t\tand\n\n\nnewlines   ",
    "digits 0123456789, 3.14159, 1,000,000",
    "def f(x):\n    return {'a': x ** 2}\n",
]


@pytest.fixture(scope="module")
def stories():
    return Tokenizer.from_dir(STORIES)


@pytest.fixture(scope="module")
def llama2():
    return Tokenizer.from_dir(shared("models/llama2-tokenizer"))


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_dir(shared("models/llama3-tokenizer"))


def stream(tokenizer, ids, context=()):
    decoder = StreamDecoder(tokenizer, list(context))
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stories260K_matches_reference(stories, reference):
    for text, ids in reference["stories260K"]["encode_examples"].items():
        assert stories.encode(text) == ids
        assert stories.decode(ids) == text
    greedy, text = reference["stories260K"]["greedy_200_from_bos"], reference["stories260K"]["greedy_200_text"]
    assert stories.decode([1] + greedy) == text
    assert stories.bos_prefix + stories.encode(text) == [1] + greedy


def test_stories260K_special_ids(stories):
    assert (stories.bos_id, stories.eos_ids, stories.bos_prefix, stories.vocab_size) == (1, {2}, [1], 512)
    assert stories.encode("<s>Once</s>") == [1, 403, 2]  # special strings become ids; "Once" keeps its dummy prefix
    assert stories.decode([1, 403, 2]) == "Once"


@pytest.mark.parametrize("name, marks", [("stories", ".?!\n.."),  # 。 is three byte tokens there
                                         ("llama2", ".?!\n.\u3002."), ("llama3", ".?!\n.\u3002.")])
def test_sentence_end_ids_are_the_tokens_that_end_a_sentence_or_a_line(name, marks, request):
    tok = request.getfixturevalue(name)
    ids = tok.encode("It rained. Did it? Yes!\nNo 3.14 \u3002 Mr Smith said so.")
    assert "".join(tok.decode([i]) for i in ids if i in tok.sentence_end_ids).replace(" ", "") == marks
    assert not tok.sentence_end_ids & {tok.bos_id, *tok.eos_ids}


def test_llama2_matches_sentencepiece(llama2):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(shared("models/llama2-tokenizer/tokenizer.model")))
    for text in TEXTS:
        assert llama2.encode(text) == sp.encode(text)
    assert llama2.encode("Hello world") == [15043, 3186]
    assert (llama2.bos_id, llama2.eos_ids, llama2.bos_prefix, llama2.vocab_size) == (1, {2}, [1], 32000)


def test_llama3_matches_tokenizers(llama3):
    hf = tokenizers.Tokenizer.from_file(str(shared("models/llama3-tokenizer/tokenizer.json")))
    for text in TEXTS:
        assert llama3.encode(text) == hf.encode(text, add_special_tokens=False).ids
    assert llama3.encode("Hello world") == [9906, 1917]
    assert llama3.encode("<|begin_of_text|>Hi<|eot_id|>") == [128000, 13347, 128009]
    assert llama3.decode([128000, 9906, 1917, 128001]) == "Hello world"
    # no add_bos_token in tokenizer_config.json: BOS comes from the post-processor
    assert (llama3.bos_id, llama3.eos_ids, llama3.bos_prefix) == (128000, {128001}, [128000])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_round_trip_and_stream(name, text, request):
    tokenizer = request.getfixturevalue(name)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=40))
def test_stream_equals_decode_on_any_text(llama2, llama3, text):
    for tokenizer in (llama2, llama3):
        ids = tokenizer.encode(text)
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids) == text


def test_stream_holds_back_split_characters(llama2, llama3):
    for tokenizer in (llama2, llama3):
        ids = tokenizer.encode("😀")
        assert "\ufffd" in tokenizer.decode(ids[:-1])  # the emoji's bytes span several tokens
        assert stream(tokenizer, ids) == [""] * (len(ids) - 1) + ["😀", ""]


def test_stream_keeps_sentencepiece_leading_space(stories, llama2):
    for tokenizer in (stories, llama2):
        ids = tokenizer.encode("Once upon a time")
        assert tokenizer.decode(ids[-1:]) == "time"  # alone, the word loses its space
        assert stream(tokenizer, ids[-1:], context=ids[:-1]) == [" time", ""]


def test_stream_window_stays_short(stories, reference):
    decoder = StreamDecoder(stories, [1])
    text = "".join(decoder.push(i) for i in reference["stories260K"]["greedy_200_from_bos"]) + decoder.flush()
    assert text == reference["stories260K"]["greedy_200_text"]
    assert len(decoder.window) <= 2


def checkpoint(tmp_path, tokenizer_config=None, **files):
    """A tokenizer directory with the stories260K SentencePiece model and the given JSON files."""
    shutil.copy(STORIES / "tokenizer.model", tmp_path / "tokenizer.model")
    if tokenizer_config is not None:
        files["tokenizer_config"] = tokenizer_config
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return tmp_path


CHATML = ("{% for m in messages %}\n"
          "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n"
          "{% endfor %}\n"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_render_chat(tmp_path):
    tokenizer = Tokenizer.from_dir(checkpoint(tmp_path, {"chat_template": CHATML}))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.render_chat(messages) == "<|user|>Hi</s>\n<|assistant|>Hello</s>\n<|assistant|>"
    assert tokenizer.render_chat(messages[:1], add_generation_prompt=False) == "<|user|>Hi</s>\n"


def test_chat_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}default"}]
    assert Tokenizer.from_dir(checkpoint(tmp_path, {"chat_template": named})).render_chat([]) == "<s>default"
    (tmp_path / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_dir(tmp_path).render_chat([]) == "from file"


def test_chat_template_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(checkpoint(tmp_path)).render_chat([])
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    tokenizer = Tokenizer.from_dir(checkpoint(tmp_path, {"chat_template": template}))
    assert tokenizer.render_chat([{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat template: user first"):
        tokenizer.render_chat([{"role": "system", "content": ""}])
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat template"):
        Tokenizer.from_dir(checkpoint(tmp_path, {"chat_template": "{% if %}"})).render_chat([])


def test_special_tokens_from_config_files(tmp_path):
    tokenizer = Tokenizer.from_dir(checkpoint(
        tmp_path, {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": False},
        config={"eos_token_id": [2, 5]}, generation_config={"eos_token_id": 7}))
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.bos_prefix) == (1, {2, 5, 7}, [])


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(STORIES / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(TokenizerError, match="config.json"):
        Tokenizer.from_dir(tmp_path)
