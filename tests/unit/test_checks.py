"""Start-up checks of a command's inputs (throttler/commands/checks.py): the manifest's name."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from throttler.commands import checks
from throttler.config import load
from throttler.errors import UsageError
from throttler.planning.catalog import Catalog

REPO = Path(__file__).resolve().parents[2]


def _write_manifest(path: Path) -> None:
    """A one-group manifest in the format the catalog reads for ``path``'s name."""
    if path.name.endswith(".parquet"):
        pq.write_table(pa.table({"group_id": ["g"], "file": ["g/f.parquet"]}), path)
        return
    codec = pa.Codec.detect(str(path)) if not path.name.endswith(".csv") else None
    with pa.output_stream(str(path), compression=codec.name if codec else None) as out:
        out.write(b"group_id,file\ng,g/f.parquet\n")


@pytest.mark.parametrize("suffix", checks.MANIFEST_SUFFIXES)
def test_every_accepted_manifest_name_is_one_the_catalog_reads(tmp_path, suffix):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "f.parquet").write_bytes(b"")
    manifest = tmp_path / f"manifest{suffix}"
    _write_manifest(manifest)
    checks.data_inputs(str(tmp_path), str(manifest))
    assert Catalog(tmp_path, manifest).files("g") == [str((tmp_path / "g" / "f.parquet").resolve())]


@pytest.mark.parametrize("name", ["manifest.json", "manifest", "manifest.PARQUET", "manifest.csv.json",
                                  "manifest.tsv"])
def test_a_manifest_named_neither_csv_nor_parquet_is_refused(tmp_path, name):
    manifest = tmp_path / name
    manifest.write_text("group_id,file\n")
    with pytest.raises(UsageError) as err:
        checks.data_inputs(str(tmp_path), str(manifest))
    assert str(err.value) == (f"manifest {manifest} is neither CSV nor Parquet: its name must end in .csv or "
                              ".parquet (or .csv.gz, .csv.bz2, .csv.lz4, .csv.zst)")


def test_a_missing_manifest_is_named_missing_before_its_format(tmp_path):
    with pytest.raises(UsageError) as err:
        checks.data_inputs(str(tmp_path), str(tmp_path / "no.json"))
    assert str(err.value) == f"manifest {tmp_path / 'no.json'} does not exist or is not readable"


def test_no_manifest_is_no_check(tmp_path):
    assert checks.data_inputs(str(tmp_path), None) is None


def test_the_example_configuration_names_a_manifest_the_checks_accept():
    manifest = load(str(REPO / "deploy" / "throttler.toml"), environ={}).manifest
    assert manifest == "/srv/throttler/data/manifest.csv"
    assert checks.manifest_format(manifest) is None
