"""`make evaluate`'s table: each figure against its target, from hand-made results."""

from benchmarks.evaluate import report, rows, table

RESULTS = {
    "NAB": {
        "standard": 60.0,  # on the bound: met
        "reward_low_FP": 49.9,
        "reward_low_FN": 70.2,
        "largest_in_alarm_share": 0.25,
        "us_per_row": 80.4,
    },
    "SKAB": {"skipped": "no SKAB runs under /nowhere"},
    "simulator": {
        "recall": {"overload": 1.0, "bearing_wear": 0.95},
        "false_alarms_per_entity_hour": 0.1,
        "us_per_window": 110.0,
        "monitor_pickle_kib": None,
    },
}


def verdicts() -> dict[tuple[str, str], bool | None]:
    return {(dataset, metric): ok for dataset, metric, _, _, ok in rows(RESULTS)}


def test_each_figure_is_met_or_missed_against_its_target() -> None:
    ok = verdicts()
    assert ok["NAB", "score, standard profile"] is True
    assert ok["NAB", "score, reward_low_FP profile"] is False
    assert ok["NAB", "largest share of scored rows in alarm"] is False
    assert ok["simulator", "false alarms (raised) per entity-hour"] is True  # on the bound


def test_figures_without_a_target_are_reported_and_not_judged() -> None:
    ok = verdicts()
    assert ok["NAB", "score, reward_low_FN profile"] is None
    assert ok["simulator", "µs per window (monitor only)"] is None
    assert "| NAB | score, reward_low_FN profile | 70.2 | - | - |" in table(RESULTS)


def test_recall_is_one_row_per_fault_kind_and_all_must_be_found() -> None:
    ok = verdicts()
    assert ok["simulator", "recall bearing_wear"] is False
    assert ok["simulator", "recall overload"] is True
    assert "| simulator | recall bearing_wear | 0.95 | >= 1.00 | missed |" in table(RESULTS)


def test_a_skipped_dataset_is_one_row_and_neither_met_nor_missed() -> None:
    skab = [row for row in rows(RESULTS) if row[0] == "SKAB"]
    assert skab == [("SKAB", "-", "skipped: no SKAB runs under /nowhere", "-", None)]


def test_a_missing_figure_misses_its_target_and_an_error_misses_the_dataset() -> None:
    results = {**RESULTS, "NAB": {"standard": None}, "SKAB": {"error": "ImportError: x"}}
    ok = {(d, m): v for d, m, _, _, v in rows(results)}
    assert ok["NAB", "score, standard profile"] is False
    assert ok["SKAB", "-"] is False


def test_percentages_show_as_such_and_the_report_names_the_misses() -> None:
    assert "| NAB | largest share of scored rows in alarm | 25.0 % | <= 20.0 % | missed |" in (
        table(RESULTS)
    )
    text = report(RESULTS, {"NAB": 12.0, "total": 12.0})
    assert "Missed: NAB score, reward_low_FP profile; NAB largest share" in text
    assert "recall bearing_wear" in text.split("Missed:")[1]
    assert text.rstrip().endswith("Run times: NAB 12 s, total 12 s.")
