"""The README's demo section: generated from the demo's summary, rewritten in place, checked before work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_study_report import LOSSES, make_run

from dpls.cli import main
from dpls.study.readme import (
    ASSETS,
    BEGIN,
    END,
    PLOT,
    SUMMARY,
    check_readme,
    current_section,
    readme_section,
    render_section,
    study_assets,
    study_markers,
    update_readme,
)
from dpls.study.report import write_report

ROOT = Path(__file__).resolve().parents[2]


def test_committed_readme_section_is_the_committed_demo_summary():
    """Fails when the README's table is edited by hand or the summary is regenerated without it."""
    summary = json.loads((ROOT / ASSETS / SUMMARY).read_text())
    assert current_section(ROOT / "README.md") == readme_section(summary, (ASSETS / PLOT).as_posix())
    assert (ROOT / ASSETS / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # it is the demo's report: its arms and seeds, paired, with where it came from and on what data
    from dpls.cli.demo import DEMO_STUDY

    assert list(summary["arms"]) == [a["name"] for a in DEMO_STUDY["arms"]] and summary["paired"]
    assert all(a["seeds"] == list(range(DEMO_STUDY["seeds"])) for a in summary["arms"].values())
    assert summary["provenance"]["command"] == "make readme"
    assert (
        summary["data"]["corpus_fingerprint"]
        and summary["provenance"]["python"] in summary["data"]["python"][0]
    )


def shipped_study_sections() -> list[str]:
    """The studies whose section the README has (their markers)."""
    text = (ROOT / "README.md").read_text()
    return [p.stem for p in sorted((ROOT / "studies").glob("*.toml")) if study_markers(p.stem)[0] in text]


def test_committed_study_sections_are_their_committed_summaries():
    """Each study section of the README is its committed summary, rendered: never typed by hand."""
    names = shipped_study_sections()
    assert "data_limited_cpu" in names
    for name in names:
        summary = json.loads((ROOT / study_assets(name) / SUMMARY).read_text())
        plot = (study_assets(name) / PLOT).as_posix()
        assert current_section(ROOT / "README.md", name) == render_section(summary, plot, name)
        assert (ROOT / study_assets(name) / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        prov = summary["provenance"]
        assert prov["command"] == f"make readme-{name}" and prov["regime"].startswith("Regime:")
        assert summary["paired"] and summary["data"]["corpus_fingerprint"]
        # self-consistent: every difference is the mean of its per-seed differences
        base = summary["baseline"]
        for arm, diffs in summary["differences"].items():
            for m, d in diffs.items():
                a, b = summary["arms"][arm]["metrics"][m], summary["arms"][base]["metrics"][m]
                pairs = [
                    (v, b["values"][b["seeds"].index(s)])
                    for s, v in zip(a["seeds"], a["values"])
                    if s in b["seeds"]
                ]
                assert d["mean"] == pytest.approx(
                    sum(x - y for x, y in pairs) / len(pairs), rel=1e-9, abs=1e-12
                )


def test_study_section_is_rewritten_in_place_and_says_where_the_curve_turned(
    tmp_path: Path, report_dir: Path
):
    (tmp_path / "repo").mkdir()
    begin, end = study_markers("mine")
    readme = tmp_path / "repo" / "README.md"
    readme.write_text(f"# T\n\n{BEGIN}\ndemo\n{END}\n\n{begin}\nOLD SECTION\n{end}\nafter\n")
    prov = {
        "command": "make readme-mine",
        "date": "2026-01-01",
        "commit": "abc",
        "machine": "m",
        "seconds": 700,
    }
    update_readme(readme, report_dir, prov, study="mine", regime="Regime: tiny.")
    text = readme.read_text()
    assert f"{BEGIN}\ndemo\n{END}" in text and text.endswith(f"{end}\nafter\n") and "OLD SECTION" not in text
    summary = json.loads((tmp_path / "repo" / study_assets("mine") / SUMMARY).read_text())
    assert summary["provenance"] == {**prov, "regime": "Regime: tiny."}
    section = current_section(readme, "mine")
    assert section == render_section(summary, f"{study_assets('mine').as_posix()}/{PLOT}", "mine")
    assert "Regime: tiny." in section and "11.7 min" in section
    assert "| best_val_ce ↓ |" in section and "| brier" not in section  # the short table
    with pytest.raises(ValueError, match="study-report:other:begin"):
        check_readme(readme, "other")


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    for arm in LOSSES:
        for seed in range(2):
            make_run(tmp_path / "runs", f"{arm}{seed}", arm, seed)
    return write_report(sorted((tmp_path / "runs").iterdir()), tmp_path / "report").parent


def readme_with_markers(path: Path, inside: str = "old table\n") -> Path:
    path.write_text(f"# Title\n\nbefore\n\n{BEGIN}\n{inside}{END}\n\nafter\n")
    return path


def test_update_rewrites_only_the_section_and_is_repeatable(tmp_path: Path, report_dir: Path):
    (tmp_path / "repo").mkdir()
    readme = readme_with_markers(tmp_path / "repo" / "README.md")
    prov = {"command": "make readme", "date": "2026-01-01", "commit": "abc1234", "machine": "m", "seconds": 7}
    update_readme(readme, report_dir, prov)
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n" + BEGIN + "\n") and text.endswith(END + "\n\nafter\n")
    assert "old table" not in text

    summary = json.loads((tmp_path / "repo" / ASSETS / SUMMARY).read_text())
    assert summary["provenance"] == prov
    assert summary["arms"] == json.loads((report_dir / SUMMARY).read_text())["arms"]
    section = current_section(readme)
    assert section == readme_section(summary, f"{ASSETS.as_posix()}/{PLOT}")
    # the table holds the report's numbers: the dpls − ce difference of `loss`, as the report wrote it
    report_rows = [r for r in (report_dir / "report.md").read_text().splitlines() if r.startswith("| loss ↓")]
    assert report_rows and report_rows[0] in section.splitlines()
    assert "abc1234" in section and f"]({ASSETS.as_posix()}/{PLOT})" in section
    assert (tmp_path / "repo" / ASSETS / PLOT).read_bytes() == (report_dir / PLOT).read_bytes()

    update_readme(readme, report_dir, prov)
    assert readme.read_text() == text


@pytest.mark.parametrize(
    "content, problem",
    [
        ("# no markers\n", "found 0 and 0"),
        (f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", "found 2 and 2"),
        (f"{END}\nx\n{BEGIN}\n", "after it"),
    ],
)
def test_bad_readme_is_refused_and_left_alone(tmp_path: Path, report_dir: Path, content: str, problem: str):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    with pytest.raises(ValueError, match=problem):
        update_readme(readme, report_dir, {})
    assert readme.read_text() == content
    assert not (tmp_path / ASSETS).exists()
    with pytest.raises(ValueError, match="no such file"):
        check_readme(tmp_path / "missing.md")


def test_demo_checks_the_readme_before_any_work(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--readme", str(tmp_path / "missing.md")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
    # a study checks its own markers before any work
    readme = readme_with_markers(tmp_path / "README.md")
    study = ROOT / "studies" / "data_limited_cpu.toml"
    assert main(["study", str(study), "--out", str(out), "--readme", str(readme)]) == 2
    assert "study-report:data_limited_cpu:begin" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_demo_report_agrees_with_its_run_files_and_the_committed_readme(tmp_path: Path, capsys, one_thread):
    """The whole demo (about two minutes on 2 idle cores; one torch thread, as the committed
    run had, so that a loaded machine does not make it crawl): its report is made of its
    runs' own numbers, and on the same corpus they are the numbers the README shows
    (regenerate with `make readme` when they move)."""
    from dpls.study.records import EVAL_METRICS, find_eval_file

    out = tmp_path / "demo"
    assert main(["demo", "--quiet", "--out", str(out)]) == 0
    report = out / "report" / "report.md"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(report)
    fresh = json.loads((out / "report" / SUMMARY).read_text())
    for arm, entry in fresh["arms"].items():
        for seed, run in zip(entry["seeds"], entry["runs"], strict=True):
            on_disk = json.loads(find_eval_file(Path(run)).read_text())
            for m in EVAL_METRICS:
                assert entry["metrics"][m]["values"][entry["metrics"][m]["seeds"].index(seed)] == on_disk[m]
        base = fresh["arms"]["ce"]["metrics"]["loss"]["values"]
        if arm != "ce":
            own = entry["metrics"]["loss"]["values"]
            mean = sum(a - b for a, b in zip(own, base, strict=True)) / len(own)
            assert fresh["differences"][arm]["loss"]["mean"] == pytest.approx(mean, rel=1e-12)

    committed = json.loads((ROOT / ASSETS / SUMMARY).read_text())
    assert committed["metrics"] == fresh["metrics"] and list(committed["arms"]) == list(fresh["arms"])
    assert fresh["data"]["corpus_fingerprint"], "the demo's runs record their corpus fingerprint"
    if fresh["data"]["corpus_fingerprint"] != committed["data"]["corpus_fingerprint"]:
        # another corpus (another Python's standard library): its numbers are its own, so only
        # the structure and the report's agreement with its runs (checked above) can be compared
        return
    for arm in fresh["arms"]:
        for m in ("loss", "top1_acc", "entropy"):
            # same code, same corpus: the same numbers up to floating-point order on another CPU,
            # which moves a trained model by at most about what another seed does
            was = committed["arms"][arm]["metrics"][m]
            tolerance = max(0.01 * abs(was["mean"]), 3 * (was["sd"] or 0.0))
            assert fresh["arms"][arm]["metrics"][m]["mean"] == pytest.approx(was["mean"], abs=tolerance), (
                f"{arm} {m}: README numbers are stale; run `make readme`"
            )


def test_readme_never_replaces_the_users_files_in_its_assets_folder(tmp_path: Path, report_dir: Path):
    """The assets folder beside the README follows the rule of every output: dpls replaces only
    what it wrote there, and says so before the study's work."""
    begin, end = study_markers("k")
    readme = tmp_path / "README.md"
    readme.write_text(f"{begin}\nold\n{end}\n")
    assets = tmp_path / study_assets("k")
    assets.mkdir(parents=True)
    for name, content in ((SUMMARY, b"notes"), (PLOT, b"\x89PNG my own plot")):
        (assets / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"assets folder: .* holds {name}, not written by dpls"):
            check_readme(readme, "k")
        with pytest.raises(ValueError, match="not written by dpls"):
            update_readme(readme, report_dir, {"command": "c"}, study="k")
        assert (assets / name).read_bytes() == content
        (assets / name).unlink()
    prov = {"command": "c"}
    update_readme(readme, report_dir, prov, study="k")  # a folder of its own files: written ...
    update_readme(readme, report_dir, prov, study="k")  # ... and replaced on the next run
    assert json.loads((assets / SUMMARY).read_text())["provenance"] == {**prov, "regime": ""}
    (assets / SUMMARY).write_text("edited by hand")  # an edited file is the user's now
    with pytest.raises(ValueError, match="not written by dpls"):
        check_readme(readme, "k")
