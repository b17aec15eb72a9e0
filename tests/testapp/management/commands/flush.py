"""``flush`` for this test project: content types and permissions stay, post_migrate is not sent.

After every transactional test Django flushes every table and then sends ``post_migrate``,
whose receivers (contenttypes, auth) insert the same content types and permissions again:
about a tenth of the CPU the test processes spend. Those rows never change during a run, so
the flush the test framework asks for (``interactive=False``) keeps those two tables, which
also keeps their ids and Django's content type cache valid, and sends nothing. Any other flush
is Django's own.
"""

from typing import Any

from django.core.management.commands import flush
from django.db import connections

KEPT = frozenset({"django_content_type", "auth_permission"})


class Command(flush.Command):
    def handle(self, **options: Any) -> None:
        if options["interactive"]:
            super().handle(**options)
            return
        connection = connections[options["database"]]
        names = connection.introspection.django_table_names(only_existing=True, include_views=False)
        sql_list = connection.ops.sql_flush(
            self.style,
            [name for name in names if name not in KEPT],
            reset_sequences=options.get("reset_sequences", True),
            allow_cascade=options.get("allow_cascade", False),
        )
        connection.ops.execute_sql_flush(sql_list)
