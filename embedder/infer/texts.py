"""A window's texts: its text column, or a --text-template filled from several columns, row by row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from embedder.config import TextSource


def window_texts(window: pa.Table, text: TextSource) -> tuple[np.ndarray, list[str]]:
    """(which rows have text, the texts of those rows in row order).

    One column: a null is no text. A template: a null field is empty text, and a row whose fields are all null
    has no text. The columns hold str (the readers decode them to large_string).
    """
    if text.template is None:
        column = window.column(text.column)
        return column.is_valid().to_numpy(zero_copy_only=False), column.drop_null().to_pylist()
    names = text.columns
    columns = [window.column(name) for name in names]
    valid = np.zeros(window.num_rows, dtype=bool)
    for column in columns:
        valid |= column.is_valid().to_numpy(zero_copy_only=False)
    fill = text.template.format_map
    texts = [fill({name: "" if value is None else value for name, value in zip(names, values)})
             for values, has_text in zip(zip(*(c.to_pylist() for c in columns)), valid) if has_text]
    return valid, texts
