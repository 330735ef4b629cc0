"""ELIZA: reflection, keyword ranking, rule choice, memory, the script parser, and `chat --model eliza`."""

import io

import pytest

from pellucid.cli import main
from pellucid.errors import ConfigError
from pellucid.history.eliza import Eliza, Script, match

# The conversation printed in Weizenbaum's 1966 paper (CACM 9(1), p. 36), and ELIZA's replies
# there. One reply differs: the last, where the paper's ELIZA chose its fourth memory form by
# a hash of the input and this one takes the forms in turn.
PAPER = [
    ("Men are all alike.", "In what way"),
    ("They're always bugging us about something or other.", "Can you think of a specific example"),
    ("Well, my boyfriend made me come here.", "Your boyfriend made you come here"),
    ("He says I'm depressed much of the time.", "I am sorry to hear you are depressed"),
    ("It's true. I am unhappy.", "Do you think coming here will help you not to be unhappy"),
    (
        "I need some help, that much seems certain.",
        "What would it mean to you if you got some help",
    ),
    ("Perhaps I could learn to get along with my mother.", "Tell me more about your family"),
    ("My mother takes care of me.", "Who else in your family takes care of you"),
    ("My father.", "Your father"),
    ("You are like my father in some ways.", "What resemblance do you see"),
    (
        "You are not very aggressive but I think you don't want me to notice that.",
        "What makes you think I am not very aggressive",
    ),
    ("You don't argue with me.", "Why do you think I don't argue with you"),
    ("You are afraid of me.", "Does it please you to believe I am afraid of you"),
    ("My father is afraid of everybody.", "What else comes to mind when you think of your father"),
    ("Bullies.", "Lets discuss further why your boyfriend made you come here"),
]


@pytest.fixture
def eliza():
    return Eliza.doctor()


def test_the_conversation_of_the_1966_paper(eliza):
    assert eliza.greeting == "How do you do. Please tell me your problem"
    for said, reply in PAPER:
        assert eliza.respond(said) == reply, said


def test_reflection_and_keyword_ranking(eliza):
    words, stack = eliza.scan("I am sad about my mother")
    assert words == ["you", "are", "sad", "about", "your", "mother"]  # I->you, am->are, my->your
    # 'my' (rank 2) goes above 'i' (rank 0); 'am' (rank 0, not above the top) to the bottom
    assert [k.word for k in stack] == ["my", "i", "am"]
    assert [k.word for k in eliza.scan("my computer hates me")[1]] == ["computer", "my"]
    # the first clause with a keyword is kept; a clause without one is dropped
    assert eliza.scan("Hmm, well. You are nice, and so on")[0] == ["i", "are", "nice"]


def test_rule_choice_cycles_through_reassemblies(eliza):
    replies = [eliza.respond("I need a holiday") for _ in range(3)]
    assert replies == [
        "What would it mean to you if you got a holiday",
        "Why do you want a holiday",
        "Suppose you got a holiday soon",
    ]
    eliza.reset()
    assert eliza.respond("I need a holiday") == replies[0]


def test_pre_newkey_and_links(eliza):
    # you're -> i'm; its rule rewrites to "i are 3" and hands that to the rules of 'you'
    assert eliza.respond("you're mad") == "What makes you think I am mad"
    # 'dreamt' ranks 4 over 'i'; 'how' has no rules of its own but those of 'what'
    assert eliza.respond("I dreamt about flying") == "Really, about flying"
    assert eliza.respond("how") == "Why do you ask"
    # 'like' (rank 10) only counts in "... is like ...": otherwise newkey passes to the next one
    assert eliza.respond("I like cats") == "You say you like cats"


def test_memory_is_recalled_when_nothing_else_matches(eliza):
    eliza.respond("my car is broken")  # input 1: remembered
    assert eliza.respond("hmm") == "I am not sure I understand you fully"  # counter at 3
    assert eliza.respond("hmm") == "Lets discuss further why your car is broken"  # counter at 4
    assert eliza.memories == []


def test_match_parts():
    tags = {"family": {"mother"}}
    pattern = [0, "your", 0, ("/", "family"), 0]
    assert match(pattern, "you love your dear mother".split(), tags) == [
        ["you", "love"], ["your"], ["dear"], ["mother"], [],
    ]  # fmt: skip
    assert match([0, "x", 2], "a x b".split(), {}) is None
    assert match([frozenset({"a", "b"}), 0], ["b", "c"], {}) == [["b"], ["c"]]


@pytest.mark.parametrize(
    "text", ["(a (b)", "(a))", "(x ((0) (y)))\n(z (= nowhere))", "(x (0))", "(memory)", "y"]
)
def test_a_broken_script_is_a_one_line_error(text):
    with pytest.raises(ConfigError, match="ELIZA script: "):
        Script.parse("(hi)\n" + text + "\n(none ((0) (go on)))")


def test_chat_with_eliza_on_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("I am unhappy.\n/reset\nMy mother hates me\n"))
    assert main(["chat", "--model", "eliza"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "How do you do. Please tell me your problem",
        "I am sorry to hear you are unhappy",
        "Tell me more about your family",
    ]
    assert "ELIZA" in err and "[conversation reset]" in err


def test_eliza_has_no_weights_to_generate_with(capsys):
    assert main(["generate", "--model", "eliza", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "chat --model eliza" in err
