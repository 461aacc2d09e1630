"""The SQL files and the code agree: every `sql("name")` in the code names a file under sql/, and
every file there is used, so a renamed or deleted file fails here, not in the middle of a run,
and no dead query is left behind. Names are read from the source as text: every call passes a
literal (the test fails on a call it cannot read, so a computed name cannot slip past)."""

import re

from music_assets.common.tables import sql, sql_dir
from tests.helpers import REPO

CALL = re.compile(r"\bsql\((?P<arg>[^)]*)\)")
LITERAL = re.compile(r"""^["'](?P<name>[\w/]+)["']$""")


def names_used() -> dict[str, set[str]]:
    """{sql file name: the source files that load it}."""
    used: dict[str, set[str]] = {}
    for path in sorted((REPO / "music_assets").rglob("*.py")) + sorted((REPO / "resources").rglob("*.py")):
        for call in CALL.finditer(path.read_text()):
            arg = call["arg"].strip()
            if path.name == "tables.py" and arg == "name: str":  # the definition itself
                continue
            literal = LITERAL.match(arg)
            assert literal, f"{path.relative_to(REPO)}: sql({arg}) does not pass a literal file name"
            used.setdefault(literal["name"], set()).add(str(path.relative_to(REPO)))
    return used


def test_every_sql_name_resolves_and_every_file_is_used():
    used = names_used()
    files = {p.relative_to(sql_dir()).with_suffix("").as_posix() for p in sql_dir().rglob("*.sql")}
    missing = {name: sorted(where) for name, where in used.items() if name not in files}
    assert not missing, f"sql(...) names with no file under {sql_dir()}: {missing}"
    assert not files - used.keys(), f"SQL files nothing loads: {sorted(files - used.keys())}"
    for name in used:
        assert sql(name).strip(), f"{name}.sql is empty"
