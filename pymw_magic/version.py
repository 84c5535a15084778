"""The package's version, in one place below every module that shows it
(the command line, an exported script's header) and the package facade."""

__version__ = "0.1.0"
