"""What became of a COMMIT whose reply was lost: asked of the server, never guessed.

The xid it was sent with, the server's life, the statements that ask, and the resolution.
Shared by both wings: a unit's COMMIT (`dropsafe._unit`) and a plain transaction's
(`dropsafe._engine`).
"""
