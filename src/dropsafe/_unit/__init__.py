"""The unit wing: a unit of work run, committed, resolved and run again (docs/architecture.md).

It never imports the engine wing (`dropsafe._engine`);
both stand on the commit truth, the drivers and the base.
"""
