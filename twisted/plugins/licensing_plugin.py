"""twistd plugin: ``twistd licensing --config etc/pool.ini [--name ls1]``.

Kept to one lazy ServiceMaker so ``twistd --help`` stays fast and keeps working
even when the application itself fails to import.
"""

from twisted.application.service import ServiceMaker

licensing = ServiceMaker(
    "licensing",
    "licensing.tap",
    "Highly available floating-license server",
    "licensing",
)
