"""``twistd licensing``: options, validated before anything starts, and makeService."""

from __future__ import annotations

from twisted.python import usage

from .errors import LicensingError


class Options(usage.Options):
    """Command-line options of ``twistd licensing``."""

    optParameters = [
        ["config", "c", None, "Path to pool.ini."],
        ["name", "n", None, "Which member of the pool this server is (may be left out in a pool of one)."],
    ]

    def postOptions(self) -> None:  # noqa: N802 - Twisted API
        from .config import load_config

        if not self["config"]:
            raise usage.UsageError("--config is required, e.g. --config etc/pool.ini")
        try:
            settings = load_config(self["config"])
            member = settings.server(self["name"])
            settings.check_files(member.name)
        except LicensingError as e:
            raise usage.UsageError(str(e)) from None
        self["settings"] = settings
        self["member"] = member.name


def makeService(options: Options):  # noqa: N802 - Twisted API
    """The only place that touches the global reactor."""
    from twisted.internet import reactor

    from .server import collect_less_often
    from .service import build_service

    collect_less_often()
    try:
        return build_service(options["settings"], reactor, name=options["member"])
    except LicensingError as e:
        raise SystemExit(f"licensing: {e}") from None
