"""``python -m revlit.studies``: usage errors are one line, exit 2, in the sub-parsers too."""

import pytest

from revlit.studies.__main__ import main


@pytest.mark.parametrize(
    "args, words",
    [
        (["nope"], "invalid choice: 'nope'"),
        (["batch_size", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "required: STUDY"),
    ],
)
def test_usage_errors_are_one_line(capsys, args, words):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err
