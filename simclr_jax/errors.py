"""The one exception type for mistakes a user can fix; entry points print it as one line."""


class UserError(ValueError):
  """A bad command line, config, dataset, workdir or checkpoint, found before compute is spent.

  The message is one sentence that says what is wrong and what to change. Entry points print
  `<program>: error: <message>` and exit with status 2; everything else is a bug and keeps its
  traceback.
  """
