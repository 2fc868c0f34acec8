import numpy as np

from diffbio_eqx._report import markdown_table, plot_embedding, plot_training, write_text


def test_figures_are_written_atomically(tmp_path):
    rng = np.random.default_rng(0)
    embedding = rng.normal(size=(60, 2))
    panels = {"cluster": rng.integers(0, 3, 60), "batch": np.repeat(["a", "b"], 30)}
    umap = plot_embedding(tmp_path / "umap.png", embedding, panels, title="test")
    training = plot_training(tmp_path / "training.png", {"vae": {"train": np.linspace(3, 1, 10),
                                                                 "validation": np.full(10, np.nan)}})
    assert umap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert training.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training.png", "umap.png"]


def test_markdown_table_and_text(tmp_path):
    table = markdown_table([{"stage": "vae", "seconds": 1.23456}, {"stage": "harmony", "seconds": 0.5}])
    assert table.splitlines()[0] == "| stage | seconds |"
    assert "| vae | 1.235 |" in table
    assert markdown_table([]) == ""
    path = write_text(tmp_path / "report.md", table)
    assert path.read_text() == table


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        text = write_text(tmp_path / "report.md", "# report\n")
        figure = plot_training(tmp_path / "training.png", {"harmony": {"objective": np.array([2.0])}})
    finally:
        os.umask(previous)
    assert [stat.S_IMODE(path.stat().st_mode) for path in (text, figure)] == [0o644, 0o644]
