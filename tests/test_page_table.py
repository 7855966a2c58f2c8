"""PageTable: pages grow with positions, a full pool changes nothing, release returns pages."""

import numpy as np
import pytest

from tier2_cpu.page_table import PageTable, PoolFullError


def test_pages_grow_with_positions_and_come_back():
  table = PageTable(num_pages=5, page_size=4, max_pages_per_seq=4)
  table.add([7, 8])
  table.grow(np.array([7, 7, 8]), np.array([0, 5, 3]))  # seq 7: 2 pages, seq 8: 1
  assert table.num_free == 2
  slots, tables = table.slots_and_tables(np.array([7, 7, 8]), np.array([0, 5, 3]), width=3)
  assert slots.tolist() == [tables[0, 0] * 4, tables[1, 1] * 4 + 1, tables[2, 0] * 4 + 3]
  assert (tables[0] == tables[1]).all() and tables[2, 1:].tolist() == [0, 0]  # one row a token; padding
  assert len(set(tables[0, :2].tolist()) | {tables[2, 0]}) == 3  # no page shared
  assert table.slots_and_tables(np.array([8]), np.array([3]), width=0)[1] is None
  with pytest.raises(PoolFullError, match="3 more KV pages needed, 2 free"):
    table.grow(np.array([8]), np.array([15]))
  assert table.num_free == 2  # the failed grow took nothing
  table.remove([7])
  assert table.num_free == 4 and 7 not in table
  table.grow(np.array([8]), np.array([15]))
  assert table.num_free == 1
  table.remove([8])
  table.add([9, 10, 11])  # two reused block-table rows (cleared) and a new one
  table.grow(np.array([9, 10, 11]), np.array([0, 4, 0]))
  _, tables = table.slots_and_tables(np.array([9, 10, 11]), np.array([0, 4, 0]), width=3)
  assert tables[:, 1:].tolist() == [[0, 0], [tables[1, 1], 0], [0, 0]]
  assert sorted([*tables[:, 0].tolist(), tables[1, 1]]) == [0, 1, 2, 3]  # low pages first, none shared


def test_add_and_remove_name_the_bad_sequence():
  table = PageTable(num_pages=2, page_size=4, max_pages_per_seq=2)
  table.add([1])
  with pytest.raises(KeyError, match="sequence 1 is already allocated"):
    table.add([2, 1])
  with pytest.raises(KeyError, match="repeat"):
    table.add([3, 3])
  with pytest.raises(KeyError, match="sequence 9 is not allocated"):
    table.remove([1, 9])
  assert 1 in table and 2 not in table and table.num_sequences == 1


def test_no_more_sequences_than_pages():
  table = PageTable(num_pages=2, page_size=4, max_pages_per_seq=2)
  table.add([1, 2])
  with pytest.raises(PoolFullError, match="2 pages"):
    table.add([3])
  assert table.num_sequences == 2


def test_a_sequence_past_its_page_limit_changes_nothing():
  table = PageTable(num_pages=8, page_size=4, max_pages_per_seq=2)
  table.add([1, 2])
  with pytest.raises(PoolFullError, match="sequence 2 would need 4 pages, more than the 2"):
    table.grow(np.array([1, 2]), np.array([3, 12]))
  assert table.num_free == 8  # sequence 1's page was not taken either
