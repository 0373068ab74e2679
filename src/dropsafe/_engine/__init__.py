"""The engine wing: what dropsafe attaches to an engine, for every request (docs/architecture.md).

It never imports the unit wing (`dropsafe._unit`);
both stand on the commit truth, the drivers and the base.
"""
