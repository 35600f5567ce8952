"""The book's table helper: what a reader sees for missing values, decimals and column names."""
import math

import pandas as pd

from toolkit import plots


def test_table_shows_a_dash_for_missing_values_and_fixed_decimals():
    df = pd.DataFrame({"test": [0.98, 0.9861], "test_sd": [math.nan, 0.0123], "method": ["a", "b"],
                       "n": [3, 4]})
    html = plots.table(df, 3, test_sd="test sd").to_html()
    assert "nan" not in html.lower() and "\u2013" in html  # NaN as an en dash
    assert "0.980" in html and "0.986" in html and "0.012" in html  # every float to 3 decimals
    assert "test sd" in html and "test_sd" not in html
    assert ">3<" in html and ">a<" in html  # integers and text untouched
    assert "white-space: nowrap" in html  # "0.979 ± 0.003" on one line
    assert df["test_sd"].isna().iloc[0]  # the frame itself is not modified
