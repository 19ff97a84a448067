"""The Gutenberg path against a local HTTP server on 127.0.0.1 serving fixtures written here."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llm_nb_utils.gutenberg import (GutenbergError, download_portuguese_corpus, parse_catalog,
                                    strip_gutenberg_boilerplate)
from llm_nb_utils.prepare import prepare_data

CATALOG = '''Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves
101,Text,2005-01-01,Os Lusíadas,pt,"Camões, Luís de",Epic poetry,PQ,
102,Text,2006-01-01,Pride and Prejudice,en,"Austen, Jane",Fiction,PR,
103,Text,2007-01-01,O Primo Basílio,pt,"Queirós, Eça de",Fiction,PQ,
104,Sound,2008-01-01,Audiolivro,pt,Anon,,,
105,Text,2009-01-01,Livro sem texto,pt,Anon,,,
106,Text,2010-01-01,Bilingue,en; pt,Anon,,,
'''

MODERN = ("\ufeffThe Project Gutenberg eBook of Os Lusíadas\r\n\r\nThis ebook is for the use of anyone...\r\n"
          "*** START OF THE PROJECT GUTENBERG EBOOK OS LUSÍADAS ***\r\n\r\n"
          "As armas e os barões assinalados\r\nQue da ocidental praia Lusitana\r\n\r\n"
          "*** END OF THE PROJECT GUTENBERG EBOOK OS LUSÍADAS ***\r\n\r\nSection 1. General Terms of Use\r\n")
OLDER = ("The Project Gutenberg EBook of O Primo Basilio, by Eça de Queirós\n\n"
         "*** START OF THIS PROJECT GUTENBERG EBOOK O PRIMO BASILIO ***\n\n"
         "Tinham dado onze horas no cuco da sala de jantar.\n\n"
         "End of the Project Gutenberg EBook of O Primo Basilio, by Eça de Queirós\n\n"
         "*** END OF THIS PROJECT GUTENBERG EBOOK O PRIMO BASILIO ***\n")
OLDEST = ("*END*THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*\n\n"
          "Texto bilingue de teste.\n\nEnd of Project Gutenberg's Bilingue, by Anon\n")


class Server:
    def __init__(self):
        self.hits, self.fail_next, self.truncate_next, self.fail_code = [], {}, set(), 503
        self.routes = {"/cache/epub/feeds/pg_catalog.csv": CATALOG, "/cache/epub/101/pg101.txt": MODERN,
                       "/cache/epub/103/pg103.txt": OLDER, "/cache/epub/106/pg106.txt": OLDEST}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.hits.append(self.path)
                if server.fail_next.get(self.path, 0) > 0:
                    server.fail_next[self.path] -= 1
                    self.send_error(server.fail_code)
                    return
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                data = body if isinstance(body, bytes) else body.encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.path in server.truncate_next:
                    server.truncate_next.discard(self.path)
                    data = data[: len(data) // 2]
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


def test_strip_boilerplate_variants():
    assert strip_gutenberg_boilerplate(MODERN).replace("\r", "").strip() == \
        "As armas e os barões assinalados\nQue da ocidental praia Lusitana"
    assert strip_gutenberg_boilerplate(OLDER).strip() == "Tinham dado onze horas no cuco da sala de jantar."
    assert strip_gutenberg_boilerplate(OLDEST).strip() == "Texto bilingue de teste."
    assert strip_gutenberg_boilerplate("sem marcadores") == "sem marcadores"


def test_catalog_selects_portuguese_text_books():
    assert [e.id for e in parse_catalog(CATALOG)] == [101, 103, 105, 106]
    with pytest.raises(GutenbergError, match="unexpected columns"):
        parse_catalog("a,b\n1,2\n")


def test_download_cache_retry_and_prepare(server, tmp_path):
    server.fail_next["/cache/epub/101/pg101.txt"] = 2        # two 503s, then success
    server.truncate_next.add("/cache/epub/103/pg103.txt")    # a cut-off body is retried
    books = download_portuguese_corpus(tmp_path, target_mb=1, base_url=server.url, backoff=0.0,
                                       log=lambda *_: None)
    assert sorted(p.name for p in books.iterdir()) == ["pg101.txt", "pg103.txt", "pg106.txt"]
    assert (books / "pg101.txt").read_text().replace("\r", "").strip().startswith("As armas")
    assert "PROJECT GUTENBERG" not in (books / "pg103.txt").read_text()
    assert server.hits.count("/cache/epub/101/pg101.txt") == 3
    assert server.hits.count("/cache/epub/103/pg103.txt") == 2
    assert "/cache/epub/105/pg105.txt" in server.hits          # 404: skipped, not fatal
    assert not list(books.glob("*.part"))

    n = len(server.hits)
    download_portuguese_corpus(tmp_path, target_mb=1, base_url=server.url, log=lambda *_: None)
    assert server.hits[n:] == ["/cache/epub/105/pg105.txt"]   # cached books are not fetched again

    meta = prepare_data(books, tmp_path / "data", source="gutenberg", log=lambda *_: None)
    assert meta["source"] == "gutenberg" and meta["corpus"]["kept"] == 3


def test_target_size_stops_downloading(server, tmp_path):
    download_portuguese_corpus(tmp_path, target_mb=1e-6, base_url=server.url, log=lambda *_: None)
    assert [h for h in server.hits if h.endswith(".txt")] == ["/cache/epub/101/pg101.txt"]


def test_partial_file_is_not_taken_for_a_finished_book(server, tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    (books / "pg101.txt.part").write_text("As armas")              # left by a killed run
    download_portuguese_corpus(tmp_path, target_mb=1, base_url=server.url, log=lambda *_: None)
    assert "/cache/epub/101/pg101.txt" in server.hits
    assert "Lusitana" in (books / "pg101.txt").read_text()


def test_offline_error_is_clear(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                       # nothing listens there
    with pytest.raises(GutenbergError) as e:
        download_portuguese_corpus(tmp_path, base_url=f"http://127.0.0.1:{port}", retries=1, backoff=0.0,
                                   log=lambda *_: None)
    assert "after 2 attempt(s)" in str(e.value) and "corpus_source='local'" in str(e.value)
    assert not (tmp_path / "pg_catalog.csv").exists()


def test_a_notebook_without_a_local_corpus_downloads_one_and_prepares_it(server, tmp_path, monkeypatch, capsys):
    """What notebooks 01 and 06 run on a fresh Colab machine: auto finds no local corpus, so books
    come from Gutenberg (here the loopback server) into the run directory, then become token files."""
    import functools
    from llm_nb_utils import env, gutenberg
    from llm_nb_utils.config import make_config
    from llm_nb_utils.notebook import NotebookRun, prepare_corpus
    monkeypatch.setattr(env, "SHARED_CORPUS", tmp_path / "no-shared-corpus")
    monkeypatch.delenv("LLM_CORPUS_DIR", raising=False)
    monkeypatch.setattr(gutenberg, "download_portuguese_corpus", functools.partial(
        download_portuguese_corpus, base_url=server.url, backoff=0.0, log=lambda *_: None))
    run = NotebookRun(make_config("smoke", device="cpu"), tmp_path / "run")
    meta = prepare_corpus(run, "auto", "", gutenberg_target_mb=1)
    assert capsys.readouterr().out.startswith("corpus: gutenberg (no local corpus")
    assert meta["source"] == "gutenberg" and meta["corpus"]["kept"] == 3
    assert sorted(p.name for p in (run.run_dir / "gutenberg" / "books").iterdir()) == \
        ["pg101.txt", "pg103.txt", "pg106.txt"]
    assert all((run.data_dir / f"{s}.bin").stat().st_size > 0 for s in ("train", "val", "test"))
