"""Reports: Markdown tables and PNG plots built from result rows."""
