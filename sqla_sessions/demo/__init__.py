"""The demo app behind `sqla-sessions demo`: every feature of the library on one small site."""
