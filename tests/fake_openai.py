"""The fake model server now ships in the package (``navi_trio.testing.fake_openai``), so
users of the testing kit can script it too; the tests keep importing it from here."""

from __future__ import annotations

from navi_trio.testing.fake_openai import (
    MODEL as MODEL,
)
from navi_trio.testing.fake_openai import (
    NEVER as NEVER,
)
from navi_trio.testing.fake_openai import (
    FakeOpenAI as FakeOpenAI,
)
from navi_trio.testing.fake_openai import (
    Recorded as Recorded,
)
from navi_trio.testing.fake_openai import (
    Reply as Reply,
)
from navi_trio.testing.fake_openai import (
    chunk as chunk,
)
from navi_trio.testing.fake_openai import (
    content as content,
)
from navi_trio.testing.fake_openai import (
    error_reply as error_reply,
)
from navi_trio.testing.fake_openai import (
    finish as finish,
)
from navi_trio.testing.fake_openai import (
    json_reply as json_reply,
)
from navi_trio.testing.fake_openai import (
    open_fake_openai as open_fake_openai,
)
from navi_trio.testing.fake_openai import (
    reasoning as reasoning,
)
from navi_trio.testing.fake_openai import (
    stream as stream,
)
from navi_trio.testing.fake_openai import (
    summary_reply as summary_reply,
)
from navi_trio.testing.fake_openai import (
    text_reply as text_reply,
)
from navi_trio.testing.fake_openai import (
    tool_fragment as tool_fragment,
)
from navi_trio.testing.fake_openai import (
    tool_reply as tool_reply,
)
