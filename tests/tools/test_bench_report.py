from dropsafe._bench._report import percentile, table


def test_percentile():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.5
    assert percentile(values, 0.99) == 99.01
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0], 0.99) == 3.0


def test_table_is_markdown_with_numbers_right_aligned():
    assert table(["driver", "req/s"], [["psycopg2", 31.4]]) == [
        "| driver | req/s |",
        "| --- | ---: |",
        "| psycopg2 | 31.4 |",
    ]
