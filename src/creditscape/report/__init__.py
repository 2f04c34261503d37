"""The report of a results folder: statistics (:mod:`.stats`), the comparisons built from the
result tables (:mod:`.analysis`), figures (:mod:`.figures`) and the document (:mod:`.document`)."""

from creditscape.report.document import summary_table as summary_table
from creditscape.report.document import write_report as write_report

__all__ = ["summary_table", "write_report"]
