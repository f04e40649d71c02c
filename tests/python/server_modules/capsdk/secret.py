"""Inside capsdk but denied by the test servers' rules (`deny capsdk.secret*`)."""


def token():
    return "s3cret"
