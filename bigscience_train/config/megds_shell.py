"""Follows a bash script as far as reading a launch needs, without running anything.

Variables are assigned in order and expanded (`$X`, `${X}`, `${X:-default}`, integer `$((...))`); quotes,
backslash continuations and comments are read as bash reads them; unquoted expansions are split into words;
here-documents are kept by the file they are written to; a `bash -c '...'` string is read as the child shell
would read it. Command substitutions and variables the file does not set stay as written, and are listed.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REDIRECT = re.compile(r"\d*(<<<|<<-|<<|>>|>&|<&|&>>|&>|>\||<>|<|>)")
# Words before assignments that keep them assignments (`export X=1`, `then X=1`).
ASSIGNMENT_PREFIXES = {"export", "declare", "typeset", "local", "readonly", "then", "else", "do"}


class ShellError(ValueError):
    """Shell text that cannot be read; the message names the file and line."""


@dataclass
class HereDoc:
    delimiter: str
    strip_tabs: bool
    expand: bool
    line: int
    body: str | None = None


@dataclass
class Command:
    fields: list[str]
    line: int


@dataclass
class Assignment:
    name: str
    value: str
    line: int


class ShellReader:
    """Reads shell text command by command, assigning variables as it goes."""

    def __init__(self, text: str, path: Path, variables: dict[str, str], line: int = 1, fixed_line=False):
        self.text, self.path, self.vars = text, path, variables
        self.pos = 0
        self.first_line, self.fixed_line = line, fixed_line
        # Newlines separate words, not commands, and nothing is assigned (a value read as an argument list).
        self.words_only = False
        self.pending: list[HereDoc] = []
        self.heredocs: dict[str, HereDoc] = {}
        self.commands: list[Command] = []
        self.assignments: list[Assignment] = []
        self.unresolved: set[str] = set()

    def line_at(self, pos: int) -> int:
        return self.first_line if self.fixed_line else self.first_line + self.text.count("\n", 0, pos)

    def error(self, message: str, pos: int) -> ShellError:
        return ShellError(f"{self.path}:{self.line_at(pos)}: {message}")

    def child(self, text: str, line: int, variables: dict[str, str] | None = None) -> ShellReader:
        return ShellReader(
            text, self.path, self.vars if variables is None else variables, line, fixed_line=True
        )

    def run(self) -> ShellReader:
        while self.pos < len(self.text):
            self.read_command()
        return self

    def words(self, text: str, line: int) -> list[str]:
        """The words a value gives as the arguments of a command (newlines are blanks there)."""
        reader = self.child(text, line)
        reader.words_only = True
        reader.run()
        self.unresolved |= reader.unresolved
        return [w for c in reader.commands for w in c.fields]

    # -- commands ---------------------------------------------------------------------------------------------

    def read_command(self) -> None:
        start = self.pos
        fields: list[str] = []
        targets: list[str] = []
        heredocs: list[HereDoc] = []
        assigning = not self.words_only
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t" or (c == "\n" and self.words_only):
                self.pos += 1
            elif self.text.startswith("\\\n", self.pos):
                self.pos += 2
            elif c == "\n":
                self.pos += 1
                self.read_heredoc_bodies()
                break
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif m := REDIRECT.match(self.text, self.pos):
                self.pos = m.end()
                self.read_redirect(m.group(1), targets, heredocs)
            elif c in ";&|":
                self.pos += 2 if self.text[self.pos : self.pos + 2] in ("&&", "||", ";;", "|&") else 1
                break
            elif assigning and (m := ASSIGNMENT.match(self.text, self.pos)):
                self.pos = m.end()
                value = "".join(self.read_word(split=False))
                name = m.group(1)
                self.vars[name] = self.vars.get(name, "") + value if m.group(2) else value
                self.assignments.append(Assignment(name, self.vars[name], self.line_at(start)))
            else:
                words = self.read_word(split=True)
                if not (assigning and not fields and words and words[0] in ASSIGNMENT_PREFIXES):
                    assigning = False
                    fields += words
        for target in targets:
            for doc in heredocs:
                self.heredocs[target] = doc
        if fields:
            self.finish(Command(fields, self.line_at(start)))

    def finish(self, command: Command) -> None:
        self.commands.append(command)
        fields = command.fields
        for i, word in enumerate(fields[:-2]):
            if Path(word).name in ("bash", "sh") and fields[i + 1] == "-c":
                # A child shell: it sees the variables; its own assignments do not come back.
                inner = self.child(fields[i + 2], command.line, dict(self.vars)).run()
                self.unresolved |= inner.unresolved
                self.commands += inner.commands
                self.heredocs.update(inner.heredocs)
                return

    def read_redirect(self, op: str, targets: list[str], heredocs: list[HereDoc]) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1
        word_start = self.pos
        word = "".join(self.read_word(split=False))
        if op in ("<<", "<<-"):
            raw = self.text[word_start : self.pos]
            doc = HereDoc(word, op == "<<-", not any(q in raw for q in "'\"\\"), self.line_at(word_start))
            self.pending.append(doc)
            heredocs.append(doc)
        elif op in (">", ">>", ">|"):
            targets.append(word)

    def read_heredoc_bodies(self) -> None:
        for doc in self.pending:
            lines = []
            while True:
                if self.pos >= len(self.text):
                    raise ShellError(
                        f"{self.path}:{doc.line}: here-document <<{doc.delimiter} never ends "
                        f"(no line {doc.delimiter!r} after it)"
                    )
                end = self.text.find("\n", self.pos)
                end = len(self.text) if end < 0 else end
                line = self.text[self.pos : end]
                self.pos = end + 1
                if doc.strip_tabs:
                    line = line.lstrip("\t")
                if line == doc.delimiter:
                    break
                lines.append(line)
            body = "\n".join(lines) + "\n"
            if doc.expand:
                inner = self.child(body, doc.line + 1)
                body = inner.read_quoted(None)
                self.unresolved |= inner.unresolved
            doc.body = body
        self.pending = []

    # -- words ------------------------------------------------------------------------------------------------

    def read_word(self, split: bool) -> list[str]:
        """The fields one shell word gives: quotes removed, variables expanded, unquoted expansions split."""
        fields: list[str] = []
        current: list[str] = []
        started = False

        def end_field() -> None:
            nonlocal current, started
            if started:
                fields.append("".join(current))
            current, started = [], False

        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t\n;&|<>":
                break
            if c == "\\":
                nxt = self.text[self.pos + 1 : self.pos + 2]
                self.pos += 2
                if nxt != "\n":
                    current.append(nxt)
                    started = True
            elif c == "'":
                end = self.text.find("'", self.pos + 1)
                if end < 0:
                    raise self.error("a single quote is never closed", self.pos)
                current.append(self.text[self.pos + 1 : end])
                started = True
                self.pos = end + 1
            elif c == '"':
                self.pos += 1
                current.append(self.read_quoted('"', self.pos - 1))
                started = True
            elif c == "$":
                value, expanded = self.read_dollar()
                pieces = re.split(r"[ \t\n]+", value) if split and expanded else [value]
                for i, piece in enumerate(pieces):
                    if i:
                        end_field()
                    current.append(piece)
                    started = started or bool(piece)
            elif c == "`":
                end = self.text.find("`", self.pos + 1)
                if end < 0:
                    raise self.error("a backquote is never closed", self.pos)
                current.append(self.text[self.pos : end + 1])
                started = True
                self.pos = end + 1
            else:
                current.append(c)
                started = True
                self.pos += 1
        end_field()
        return fields

    def read_quoted(self, end: str | None, opened: int = 0) -> str:
        """Double-quoted text up to `end` (consumed; it opened at `opened`), or a here-document body to the
        end of the text."""
        out = []
        escapable = '$`"\\\n' if end else "$`\\\n"
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == end:
                self.pos += 1
                return "".join(out)
            if c == "\\" and self.text[self.pos + 1 : self.pos + 2] in escapable:
                nxt = self.text[self.pos + 1]
                out.append("" if nxt == "\n" else nxt)
                self.pos += 2
            elif c == "$":
                out.append(self.read_dollar()[0])
            elif c == "`":
                close = self.text.find("`", self.pos + 1)
                close = len(self.text) - 1 if close < 0 else close
                out.append(self.text[self.pos : close + 1])
                self.pos = close + 1
            else:
                out.append(c)
                self.pos += 1
        if end:
            raise self.error("a double quote is never closed", opened)
        return "".join(out)

    def read_dollar(self) -> tuple[str, bool]:
        """A `$` expansion at pos: its value and whether it was expanded (else its text, as written)."""
        start, text = self.pos, self.text
        if text.startswith("$((", start):
            end = self.closing(start + 1)
            self.pos = end
            value = self.arithmetic(text[start + 3 : end - 2])
            return (value, True) if value is not None else (text[start:end], False)
        if text.startswith("$(", start):
            self.pos = self.closing(start + 1)
            return text[start : self.pos], False
        if text.startswith("${", start):
            end = text.find("}", start)
            if end < 0:
                raise self.error("a ${ is never closed", start)
            self.pos = end + 1
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-=])(.*))?", text[start + 2 : end], re.S)
            if m is None:
                return text[start : self.pos], False
            name, op, default = m.groups()
            value = self.vars.get(name)
            if op and (value is None or (op.startswith(":") and value == "")):
                value = self.child(default, self.line_at(start)).read_quoted(None)
                if op.endswith("="):
                    self.vars[name] = value
            if value is None:
                self.unresolved.add(name)
                return text[start : self.pos], False
            return value, True
        m = NAME.match(text, start + 1)
        if m is None:
            self.pos = start + 1 + (text[start + 1 : start + 2] in "@*#?$!-0123456789")
            return text[start : self.pos], False
        self.pos = m.end()
        if m.group(0) not in self.vars:
            self.unresolved.add(m.group(0))
            return text[start : self.pos], False
        return self.vars[m.group(0)], True

    def closing(self, open_pos: int) -> int:
        """The position after the parenthesis that closes the one at open_pos."""
        depth, pos = 0, open_pos
        while pos < len(self.text):
            c = self.text[pos]
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    return pos + 1
            elif c == "'":
                pos = max(self.text.find("'", pos + 1), pos)
            pos += 1
        raise self.error("a $( is never closed", open_pos - 1)

    def arithmetic(self, expression: str) -> str | None:
        """bash's integer $((...)), when every variable in it is known; None otherwise."""
        unknown = []

        def value(m: re.Match) -> str:
            name = m.group(1) or m.group(2) or m.group(3)
            if name not in self.vars:
                unknown.append(name)
                return "0"
            return self.vars[name].replace("_", "")

        numeric = re.sub(r"\$\{(\w+)\}|\$(\w+)|\b([A-Za-z_]\w*)\b", value, expression)
        if unknown:
            self.unresolved.update(unknown)
            return None
        try:
            return str(integer_expression(ast.parse(numeric.strip(), mode="eval").body))
        except (SyntaxError, ValueError, ZeroDivisionError):
            return None


def integer_expression(node: ast.AST) -> int:
    """Integer arithmetic as bash does it (division truncates toward zero)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = integer_expression(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        a, b = integer_expression(node.left), integer_expression(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            quotient = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
            return a - b * quotient if isinstance(node.op, ast.Mod) else quotient
    raise ValueError("not integer arithmetic")
