"""Known-answer tests of the search's pure parts: answer extraction and voting,
selection on hand-made trial tables, the reasoning-rate strategies, query selection,
settings. No engine."""

from __future__ import annotations

import json
import math

import pytest

from mergekit_rlvr.errors import UserError
from mergekit_rlvr.search.answers import extract_answer, group_answers, last_boxed, majority_vote
from mergekit_rlvr.search.queries import difficulty, load_queries, select_by_difficulty, select_queries
from mergekit_rlvr.search.reasoning import binary_search, grid_points, grid_search, trace_is_empty
from mergekit_rlvr.search.selection import excluded, knee, largest_alpha, max_consistency, pareto_front, select_dots
from mergekit_rlvr.search.settings import load_settings


# --------------------------------------------------------------------------- answers
def test_last_boxed_balances_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{x^{2}+\sqrt{y_{1}}}") == r"x^{2}+\sqrt{y_{1}}"
    assert last_boxed(r"unclosed \boxed{\frac{1}{2}") is None
    assert last_boxed(r"\boxed{3} and an unclosed \boxed{4") == "3"


def test_extraction_falls_back_as_the_authors_code():
    assert extract_answer("<answer> 7 </answer> \\boxed{8}") == "7"
    assert extract_answer(r"so \boxed{\frac{3}{4}}. Also 9") == r"\frac{3}{4}"
    assert extract_answer("The answer is -12.5, not 3") == "-12.5"
    assert extract_answer("we get 3 then 41") == "41"
    assert extract_answer("no digits here") is None
    assert extract_answer(r"empty \boxed{} then 5") == "5"


def test_equivalent_spellings_vote_together():
    vote = majority_vote(["1/2", r"\frac{1}{2}", "0.5", "3", "3"])
    assert vote.votes == 3 and vote.samples == 5 and vote.consistency == pytest.approx(0.6)
    assert majority_vote([r"\frac{1}{2}", "0.5", "1/2"]).consistency == 1.0
    assert majority_vote(["x = 3", "3", "4"]).votes == 2
    assert group_answers(["2", "3", "4"]) == [("2", 1), ("3", 1), ("4", 1)]


def test_consistency_is_eq4_unparseable_samples_form_no_class():
    # max over answers y of (samples equal to y) / m, m counting the unparseable ones
    assert majority_vote([None, None, "5", "5"]).consistency == 0.5
    assert majority_vote(["5", "5", None, None]).consistency == 0.5
    assert majority_vote([None, None, None, "5", "5"]).consistency == pytest.approx(0.4)
    assert majority_vote([None, None, None, "3", "4"]).consistency == pytest.approx(0.2)
    assert majority_vote([None, None]).consistency == 0.0 and majority_vote([]).consistency == 0.0
    assert majority_vote(["3", None, None, "3", "3.0"]).consistency == pytest.approx(0.6)
    # brute force: every order of a multiset gives the same value and the same answer
    import itertools

    for sample in (["7", "8", None, "8", "7", None], ["1/2", "0.5", "2", "2", None]):
        votes = {(v.answer is not None and v.answer in ("7", "1/2", "0.5"), v.votes)
                 for v in (majority_vote(list(p)) for p in itertools.permutations(sample))}
        assert len(votes) == 1
    assert majority_vote(["8", "7"]).answer == majority_vote(["7", "8"]).answer == "7"


def test_unparseable_majority_scores_zero_with_the_authors_rule():
    assert majority_vote([None, None, None, "3", "4"], "authors").consistency == 0.0
    assert majority_vote([None, "3", None, "3"], "authors").consistency == 0.0  # tie: the first cluster (None)
    assert majority_vote(["3", None, "3", None], "authors").consistency == 0.5
    assert majority_vote([], "authors").consistency == 0.0
    assert majority_vote(["3", None, None, "3", "3.0"], "authors").consistency == pytest.approx(0.6)
    assert load_settings({"consistency": "authors"}).consistency == "authors"
    with pytest.raises(UserError, match="search.consistency"):
        load_settings({"consistency": "max"})


def test_text_answers_vote_by_normalized_text():
    assert majority_vote(["Paris", "paris ", "London"]).votes == 2
    # words are words, not products of one-letter variables (math-verify reads qnye = nyqe)
    assert group_answers(["qnye", "nyqe", r"\text{QNYE}"]) == [("qnye", 2), ("nyqe", 1)]
    assert majority_vote(["ab", "ba", "2"]).votes == 1


# --------------------------------------------------------------------------- selection
def rows(*triples):
    return [{"number": i, "consistency": c, "perplexity": p} for i, (c, p) in enumerate(triples)]


TABLE = rows((0.50, 10.0), (0.70, 12.0), (0.90, 20.0), (0.60, 15.0), (0.70, 11.0), (0.30, 9.0), (0.90, 25.0))


def test_pareto_front_by_hand():
    assert [r["number"] for r in pareto_front(TABLE)] == [0, 2, 4, 5]


def test_max_consistency_by_hand():
    selected, _ = select_dots(TABLE, "max_consistency")
    assert selected["number"] == 2  # 0.9 at perplexity 20 beats 0.9 at 25


def test_knee_by_hand():
    # front: (0.5,10) (0.9,20) (0.7,11) (0.3,9); normalized gaps to (max c, min p):
    # c gap = (0.9-c)/0.6, p gap = (p-9)/11 -> #0 (0.667, 0.091) #2 (0, 1) #4 (0.333, 0.182) #5 (1, 0)
    selected, front = select_dots(TABLE, "knee")
    assert selected["number"] == 4
    distances = {r["number"]: math.hypot((0.9 - r["consistency"]) / 0.6, (r["perplexity"] - 9) / 11) for r in front}
    assert min(distances, key=distances.get) == 4


def test_non_finite_trials_are_never_selected():
    # a degenerate trial (c = 1, perplexity inf) is on the raw front and, with it, the
    # perplexity range is infinite: the knee would take it; it is excluded instead
    table = TABLE + rows(*[(0.0, 0.0)] * 7, (1.0, math.inf), (0.95, math.nan))[7:]
    assert excluded(table) == 2
    for how in ("knee", "max_consistency"):
        selected, front = select_dots(table, how)
        assert selected["number"] == select_dots(TABLE, how)[0]["number"]
        assert [r["number"] for r in front] == [0, 2, 4, 5]
    with pytest.raises(ValueError, match="finite"):
        select_dots(rows((1.0, math.inf)), "knee")


def test_knee_with_constant_perplexity_is_max_consistency():
    table = rows((0.4, 5.0), (0.8, 5.0), (0.6, 5.0))
    assert knee(pareto_front(table))["number"] == 1
    assert max_consistency(pareto_front(table))["number"] == 1


def test_largest_alpha_above_rho_min():
    table = [{"number": i, "alpha": a, "reasoning_rate": r}
             for i, (a, r) in enumerate([(1.0, 0.2), (0.5, 1.0), (0.75, 0.85), (0.625, 0.95), (0.7, 0.9)])]
    assert largest_alpha(table, 0.9)["alpha"] == 0.7  # rate exactly rho_min counts
    assert largest_alpha(table, 0.96)["alpha"] == 0.5
    assert largest_alpha(table, 0.99, fallback=0.0)["alpha"] == 0.5
    assert largest_alpha(table[:1], 0.9, fallback=0.0) == {"alpha": 0.0, "number": -1, "reasoning_rate": pytest.approx(float("nan"), nan_ok=True)}


# --------------------------------------------------------------------------- reasoning strategies
def monotone(threshold_alpha, drop=4.0):
    """Rate 1 up to threshold_alpha, then falling linearly."""
    return lambda alpha: 1.0 if alpha <= threshold_alpha else max(0.0, 1.0 - drop * (alpha - threshold_alpha))


def test_grid_is_alg1():
    rates = grid_search(monotone(0.5), (0.0, 1.0), 4)
    assert sorted(rates) == grid_points((0.0, 1.0), 4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    table = [{"number": i, "alpha": a, "reasoning_rate": r} for i, (a, r) in enumerate(rates.items())]
    assert largest_alpha(table, 0.9)["alpha"] == 0.5


def test_binary_search_brackets_and_stops_early():
    calls = []

    def evaluate(alpha):
        calls.append(alpha)
        return monotone(0.3, drop=0.5)(alpha)  # rate 0.9 at alpha 0.5: within [0.9, 1)

    rates = binary_search(evaluate, (0.0, 1.0), 0.9, max_steps=8)
    assert calls == [1.0, 0.5]  # hi fails, mid has rate in [rho_min, 1): stop at once
    table = [{"number": i, "alpha": a, "reasoning_rate": r} for i, (a, r) in enumerate(rates.items())]
    assert largest_alpha(table, 0.9)["alpha"] == 0.5


def test_binary_search_step_budget_and_answer():
    calls = []

    def evaluate(alpha):
        calls.append(alpha)
        return 1.0 if alpha <= 0.3 else 0.0  # a cliff: never in [rho_min, 1)

    rates = binary_search(evaluate, (0.0, 1.0), 0.9, max_steps=8)
    assert len(calls) == 8 and calls[:4] == [1.0, 0.5, 0.25, 0.375]
    best = max(a for a, r in rates.items() if r >= 0.9)
    assert 0.3 - 1 / 64 <= best <= 0.3  # bracket width after 7 bisections is 1/128


def test_binary_search_upper_bound_passes():
    assert binary_search(lambda a: 1.0, (0.0, 1.0), 0.9) == {1.0: 1.0}


def test_trace_detection():
    assert trace_is_empty("</think>The answer is", "</think>", finished=False)
    assert trace_is_empty("\n </think>", "</think>", finished=True)
    assert trace_is_empty("</th", "</think>", finished=False)  # budget ran out inside the marker
    assert not trace_is_empty("Let me see", "</think>", finished=False)
    assert not trace_is_empty("Let me see</think>42", "</think>", finished=True)
    assert trace_is_empty("", "</think>", finished=True)  # ended at once
    assert not trace_is_empty("", "</think>", finished=False)


# --------------------------------------------------------------------------- queries
def test_difficulty_and_stratified_selection_by_hand():
    assert difficulty([1.0, 0.6]) == pytest.approx(0.2)
    assert difficulty([0.2, 0.4, 0.6]) == pytest.approx(0.6)
    scores = [0.0, 0.9, 0.2, 0.4, 0.85, 0.1, 0.6, 0.3, 0.5, 0.7]
    chosen = select_by_difficulty(scores, n=4, threshold=0.8, seed=0)
    kept = sorted((d, i) for i, d in enumerate(scores) if d <= 0.8)  # 8 kept; low = 4 easiest
    low = {i for _, i in kept[:4]}
    assert len(chosen) == 4 and all(scores[c.index] <= 0.8 for c in chosen)
    assert sum(c.split == "low" for c in chosen) == 2 and all((c.index in low) == (c.split == "low") for c in chosen)
    assert chosen == select_by_difficulty(scores, n=4, threshold=0.8, seed=0)  # seeded
    assert len(select_by_difficulty(scores, n=100, threshold=0.8)) == 8  # small halves: take all


def test_selection_strategies_of_tables_7_and_8():
    scores = [0.0, 0.9, 0.2, 0.4, 0.85, 0.1, 0.6, 0.3, 0.5, 0.7]  # kept: 8; low = 0.0 0.1 0.2 0.3
    low, medium, hard = {0, 5, 2, 7}, {3, 8, 6, 9}, {1, 4}
    pick = lambda strategy, **kw: select_queries(scores, 4, 0.8, 0, strategy=strategy, **kw)  # noqa: E731
    assert {s.index for s in pick("easy")} == low and {s.index for s in pick("medium")} == medium
    assert pick("stratified") == select_by_difficulty(scores, 4, 0.8, 0)
    quarter = pick("stratified", easy_fraction=0.25)  # Table 7's 25:75
    assert sum(s.split == "low" for s in quarter) == 1 and sum(s.split == "medium" for s in quarter) == 3
    assert [s.split for s in pick("stratified", easy_fraction=1.0)] == [s.split for s in pick("easy")]
    # random: the whole pool, difficulty unused; all 10 when n is larger
    assert {s.index for s in select_queries(scores, 20, 0.8, 0, strategy="random")} == set(range(10))
    every = select_queries(scores, 10, 0.8, 0, strategy="random")
    assert {s.index for s in every if s.split == "hard"} == hard
    # diverse: equal numbers per data source, then what is left
    groups = ["a", "a", "a", "a", "a", "a", "b", "b", "c", "c"]
    chosen = select_queries(scores, 6, 0.8, 0, strategy="diverse", groups=groups)
    assert sorted(groups[s.index] for s in chosen) == ["a", "a", "b", "b", "c", "c"]
    chosen = select_queries(scores, 8, 0.8, 0, strategy="diverse", groups=groups)
    assert sorted(groups[s.index] for s in chosen) == ["a"] * 4 + ["b", "b", "c", "c"]
    # the default threshold 1 - 1/m is compared with slack: D = 0.8 at m = 5 is kept
    assert [s.index for s in select_queries([1 - (0.2 + 0.2) / 2], 1, 1 - 1 / 5)] == [0]
    with pytest.raises(UserError, match="--strategy"):
        pick("uniform")


def test_load_queries_jsonl_parquet_and_errors(tmp_path):
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n\n" + json.dumps({"prompt": "2+2?"}) + "\n")
    queries = load_queries(str(jsonl))
    assert [q.prompt for q in queries] == ["1+1?", "2+2?"] and queries[0].answer == "2" and queries[1].answer is None

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "q.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "What is 3?"}]], "data_source": ["x"]}), parquet)
    assert load_queries(str(parquet))[0].prompt == "What is 3?"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl: row 1 has no 'prompt'"):
        load_queries(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1: not valid JSON"):
        load_queries(str(bad))
    with pytest.raises(UserError, match="no such query file"):
        load_queries(str(tmp_path / "missing.jsonl"))


# --------------------------------------------------------------------------- settings
def test_settings_defaults_block_and_flags():
    s = load_settings(None)
    assert (s.objective, s.sampler, s.bounds, s.samples, s.temperature, s.max_tokens, s.select) == \
        ("dots", "tpe", (0.0, 2.0), 5, 0.6, 8192, "max_consistency")
    s = load_settings({"sampler": "nsga2", "bounds": [0.5, 2], "samples": 7}, {"samples": 3, "trials": None})
    assert (s.sampler, s.bounds, s.samples, s.trials) == ("nsga2", (0.5, 2.0), 3, 100)
    r = load_settings({}, merge_method="reasoning_interp")
    assert (r.objective, r.bounds, r.strategy, r.detect, r.rho_min, r.max_steps) == \
        ("reasoning_rate", (0.0, 1.0), "binary", "prefix", 0.9, 8)


@pytest.mark.parametrize("block, message", [
    ({"sampler": "cmaes"}, "search.sampler: 'cmaes' is not one of"),
    ({"bounds": [2, 0]}, "search.bounds"),
    ({"samples": 0}, "search.samples: must be at least 1"),
    ({"trails": 5}, "search.trails: unknown setting"),
    ({"engine": "x"}, "search.engine"),
    ({"rho_min": 1.5}, "search.rho_min"),
    ({"template": "no placeholder"}, "search.template"),
])
def test_settings_errors_name_the_setting(block, message):
    with pytest.raises(UserError, match=message):
        load_settings(block)


def test_verl_layout_answers_and_messages_rendered_as_given(tmp_path, tiny_family):
    """The DoTS data's verl layout: prompt = chat messages with a system turn, the answer
    under reward_model.ground_truth; prompt_format: messages renders them as given."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from mergekit_rlvr.search.prompts import query_prompts

    messages = [{"role": "system", "content": "You are a careful solver."},
                {"role": "user", "content": "What is 6*7?"}]
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.table({"data_source": ["math"], "prompt": [messages],
                             "reward_model": [{"ground_truth": "42", "style": "rule"}]}), path)
    (query,) = load_queries(str(path))
    assert (query.prompt, query.answer, query.messages) == ("What is 6*7?", "42", messages)
    tokenizer = AutoTokenizer.from_pretrained(tiny_family["base"])
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    as_given = load_settings({"prompt_format": "messages"})
    assert query_prompts(tokenizer, [query], as_given) == [expected]
    assert "You are a careful solver." in expected and "boxed" not in expected
    default = query_prompts(tokenizer, [query], load_settings({}))[0]
    assert "You are a careful solver." not in default and "What is 6*7?" in default and "boxed" in default
    # perplexity prompts stay the question alone in both formats
    assert query_prompts(tokenizer, [query], as_given, instruction="") == \
        query_prompts(tokenizer, [query], load_settings({}), instruction="")
