"""The one exception type that launch.py turns into a single-line message and a non-zero exit."""


class UserError(Exception):
  """Something the user can fix (bad config, missing data, unreadable checkpoint...).

  The message names the problem and the fix in one line; launch.py prints it without a traceback.
  """
