"""Sends three logs with the official SLS Python SDK's put_logs.

Usage: logship_sdk_put_logs.py ENDPOINT AK SECRET PROJECT LOGSTORE v1|v4 ID_PREFIX [route]
With "route" the request carries a hash key (POST .../shards/route?key=...)
and log tags. Prints request_id=... and exits 0, or prints error_code=...
and exits 1.
"""

import sys

from aliyun.log import LogClient, LogException, LogItem, PutLogsRequest


def main():
    endpoint, key_id, secret, project, logstore, auth, prefix = sys.argv[1:8]
    route = sys.argv[8:9] == ["route"]
    client = LogClient(endpoint, key_id, secret, auth_version=auth, region="cn-hangzhou")
    items = []
    for i in range(3):
        item = LogItem(timestamp=1700000000 + i)
        item.set_contents([
            ("id", "%s-%d" % (prefix, i)),
            ("outputs", '{"text": "hello"}'),
            ("status", "succeeded"),
        ])
        items.append(item)
    if route:
        request = PutLogsRequest(project, logstore, "dify", "", items, hashKey="0123456789abcdef",
                                 compress=True, logtags=[("tenant", "t-1")])
    else:
        request = PutLogsRequest(project, logstore, "dify", "", items, compress=True)
    try:
        response = client.put_logs(request)
    except LogException as err:
        print("error_code=%s message=%s" % (err.get_error_code(), err.get_error_message()))
        return 1
    print("request_id=%s" % response.get_request_id())
    return 0


if __name__ == "__main__":
    sys.exit(main())
