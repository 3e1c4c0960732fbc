//! Parses the statements the capture understands into a [`Statement`]:
//! `INSERT INTO [schema.]table (cols) VALUES (...), ... [ON CONFLICT ...]
//! [RETURNING ...]` and `UPDATE [schema.]table SET col = value, ... WHERE
//! [table.]pk = value [RETURNING ...]`.

use super::lexer::{Token, TokenKind};
use super::CaptureError;

/// A table name as written: unquoted parts are already lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

/// A value the capture can turn into text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A literal's text: a string's value, or a number or boolean as written.
    Literal(String),
    /// `$n`, resolved from the Bind message's parameters.
    Param(usize),
    Null,
    /// `DEFAULT`: the column is left to PostgreSQL and not captured.
    Default,
    /// `now()`, `CURRENT_TIMESTAMP` and the like: the capture time.
    Now,
}

/// Whether a statement inserted or updated rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
}

impl Operation {
    /// `insert` or `update`, as `__op__` carries it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
        }
    }
}

/// A parsed INSERT or UPDATE: one list of (column, value) per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub operation: Operation,
    pub table: TableName,
    pub rows: Vec<Vec<(String, Value)>>,
    /// For UPDATE: the column the WHERE clause pins, with its value.
    pub key: Option<(String, Value)>,
}

/// Parses one statement (without a trailing `;`). Returns `Ok(None)` for
/// statements that are neither INSERT nor UPDATE.
pub fn parse(tokens: &[Token], sql: &str) -> Result<Option<Statement>, CaptureError> {
    let mut parser = Parser {
        tokens,
        pos: 0,
        sql,
    };
    let statement = if parser.eat_keyword("insert") {
        parser.insert()?
    } else if parser.eat_keyword("update") {
        parser.update()?
    } else {
        return Ok(None);
    };
    Ok(Some(statement))
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
    sql: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&TokenKind> {
        self.tokens.get(self.pos).map(|t| &t.kind)
    }

    fn next(&mut self) -> Option<&TokenKind> {
        let token = self.tokens.get(self.pos).map(|t| &t.kind);
        self.pos += 1;
        token
    }

    fn eat_keyword(&mut self, word: &str) -> bool {
        if self.peek().is_some_and(|t| t.is_keyword(word)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_punct(&mut self, punct: char) -> bool {
        if self.peek() == Some(&TokenKind::Punct(punct)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect_keyword(&mut self, word: &str) -> Result<(), CaptureError> {
        if self.eat_keyword(word) {
            Ok(())
        } else {
            Err(self.syntax(&format!("expected {}", word.to_uppercase())))
        }
    }

    fn expect_punct(&mut self, punct: char) -> Result<(), CaptureError> {
        if self.eat_punct(punct) {
            Ok(())
        } else {
            Err(self.syntax(&format!("expected '{punct}'")))
        }
    }

    fn syntax(&self, expected: &str) -> CaptureError {
        let near = match self.tokens.get(self.pos) {
            Some(token) => format!("near {:?}", &self.sql[token.start..token.end]),
            None => "at end of statement".to_string(),
        };
        CaptureError::Syntax(format!("{expected} {near}"))
    }

    fn unsupported(&self, what: &str) -> CaptureError {
        CaptureError::Unsupported(what.to_string())
    }

    fn identifier(&mut self) -> Result<String, CaptureError> {
        match self.peek() {
            Some(TokenKind::Ident { name, .. }) => {
                let name = name.clone();
                self.pos += 1;
                Ok(name)
            }
            _ => Err(self.syntax("expected an identifier")),
        }
    }

    fn table_name(&mut self) -> Result<TableName, CaptureError> {
        let first = self.identifier()?;
        if self.eat_punct('.') {
            let name = self.identifier()?;
            return Ok(TableName {
                schema: Some(first),
                name,
            });
        }
        Ok(TableName {
            schema: None,
            name: first,
        })
    }

    /// Skips `[AS] alias` after a table name, returning the alias.
    fn alias(&mut self) -> Result<Option<String>, CaptureError> {
        if self.eat_keyword("as") {
            return self.identifier().map(Some);
        }
        match self.peek() {
            Some(TokenKind::Ident { name, quoted }) if *quoted || !is_clause_keyword(name) => {
                let name = name.clone();
                self.pos += 1;
                Ok(Some(name))
            }
            _ => Ok(None),
        }
    }

    fn insert(&mut self) -> Result<Statement, CaptureError> {
        self.expect_keyword("into")?;
        let table = self.table_name()?;
        self.alias()?;
        if !self.eat_punct('(') {
            return Err(if self.peek().is_some_and(|t| t.is_keyword("default")) {
                self.unsupported("INSERT ... DEFAULT VALUES")
            } else {
                CaptureError::MissingColumnList
            });
        }
        let mut columns = vec![self.identifier()?];
        while self.eat_punct(',') {
            columns.push(self.identifier()?);
        }
        self.expect_punct(')')?;
        if self.eat_keyword("overriding") {
            for _ in 0..2 {
                self.next();
            }
        }
        if !self.eat_keyword("values") {
            return Err(self.unsupported("INSERT without VALUES (such as INSERT ... SELECT)"));
        }
        let mut rows = Vec::new();
        loop {
            self.expect_punct('(')?;
            let mut values = vec![self.value()?];
            while self.eat_punct(',') {
                values.push(self.value()?);
            }
            self.expect_punct(')')?;
            if values.len() != columns.len() {
                return Err(CaptureError::ColumnCountMismatch {
                    row: rows.len() + 1,
                    columns: columns.len(),
                    values: values.len(),
                });
            }
            rows.push(columns.iter().cloned().zip(values).collect());
            if !self.eat_punct(',') {
                break;
            }
        }
        self.trailing(&["on", "returning"])?;
        Ok(Statement {
            operation: Operation::Insert,
            table,
            rows,
            key: None,
        })
    }

    fn update(&mut self) -> Result<Statement, CaptureError> {
        self.eat_keyword("only");
        let table = self.table_name()?;
        let alias = self.alias()?;
        self.expect_keyword("set")?;
        let mut row = Vec::new();
        loop {
            if self.peek() == Some(&TokenKind::Punct('(')) {
                return Err(self.unsupported("UPDATE ... SET (columns) = (...)"));
            }
            let column = self.identifier()?;
            self.expect_punct('=')?;
            row.push((column, self.value()?));
            if !self.eat_punct(',') {
                break;
            }
        }
        if self.eat_keyword("from") {
            return Err(self.unsupported("UPDATE ... FROM"));
        }
        if !self.eat_keyword("where") {
            return Err(self.unsupported("UPDATE without a WHERE clause on the primary key"));
        }
        let mut column = self.identifier()?;
        if self.eat_punct('.') {
            if column != table.name && Some(&column) != alias.as_ref() {
                return Err(self.unsupported("WHERE on a column of another table"));
            }
            column = self.identifier()?;
        }
        self.expect_punct('=')?;
        let value = self.value()?;
        match self.peek() {
            None => {}
            Some(kind) if kind.is_keyword("returning") || *kind == TokenKind::Punct(';') => {}
            Some(_) => {
                return Err(self.unsupported(
                    "UPDATE whose WHERE clause is more than one primary key equality",
                ))
            }
        }
        Ok(Statement {
            operation: Operation::Update,
            table,
            rows: vec![row],
            key: Some((column, value)),
        })
    }

    /// Accepts the end of the statement or one of `clauses` followed by
    /// anything (ON CONFLICT and RETURNING do not change what was written).
    fn trailing(&mut self, clauses: &[&str]) -> Result<(), CaptureError> {
        match self.peek() {
            None => Ok(()),
            Some(kind) if clauses.iter().any(|c| kind.is_keyword(c)) => Ok(()),
            Some(_) => Err(self.syntax("expected end of statement")),
        }
    }

    /// Parses a value: a literal, `$n`, NULL, DEFAULT, TRUE/FALSE, a signed
    /// number, the current time, or one of these in parentheses or a cast.
    fn value(&mut self) -> Result<Value, CaptureError> {
        let value = self.value_without_cast()?;
        while self.peek() == Some(&TokenKind::Cast) {
            self.pos += 1;
            self.type_name()?;
        }
        Ok(value)
    }

    fn value_without_cast(&mut self) -> Result<Value, CaptureError> {
        let start = self.pos;
        let value = match self.next().cloned() {
            Some(TokenKind::String(text)) => Value::Literal(text),
            Some(TokenKind::Number(text)) => Value::Literal(text),
            Some(TokenKind::Param(n)) => Value::Param(n),
            Some(TokenKind::Operator(sign)) if sign == "-" || sign == "+" => match self.next() {
                Some(TokenKind::Number(text)) if sign == "-" => Value::Literal(format!("-{text}")),
                Some(TokenKind::Number(text)) => Value::Literal(text.clone()),
                _ => return Err(self.unsupported_expression(start)),
            },
            Some(TokenKind::Punct('(')) => {
                let inner = self.value()?;
                self.expect_punct(')')?;
                inner
            }
            Some(TokenKind::Ident {
                name,
                quoted: false,
            }) => match name.as_str() {
                "null" => Value::Null,
                "default" => Value::Default,
                "true" => Value::Literal("true".into()),
                "false" => Value::Literal("false".into()),
                "current_timestamp" | "localtimestamp" => Value::Now,
                "now" | "statement_timestamp" | "transaction_timestamp" | "clock_timestamp"
                    if self.eat_punct('(') =>
                {
                    self.expect_punct(')')?;
                    Value::Now
                }
                "cast" if self.eat_punct('(') => {
                    let inner = self.value()?;
                    self.expect_keyword("as")?;
                    self.type_name()?;
                    self.expect_punct(')')?;
                    inner
                }
                // A typed literal such as `timestamp '2024-01-01'`.
                "timestamp" | "timestamptz" | "date" | "uuid" | "json" | "jsonb" | "numeric"
                | "interval" | "text"
                    if matches!(self.peek(), Some(TokenKind::String(_))) =>
                {
                    self.value_without_cast()?
                }
                _ => return Err(self.unsupported_expression(start)),
            },
            _ => return Err(self.unsupported_expression(start)),
        };
        if matches!(
            self.peek(),
            Some(TokenKind::Operator(_)) | Some(TokenKind::Punct('['))
        ) {
            return Err(self.unsupported_expression(start));
        }
        Ok(value)
    }

    fn unsupported_expression(&self, start: usize) -> CaptureError {
        let token = &self.tokens[start.min(self.tokens.len().saturating_sub(1))];
        let end = self.tokens.get(self.pos).map_or(self.sql.len(), |t| t.end);
        let text: String = self.sql[token.start..end.max(token.end)]
            .chars()
            .take(60)
            .collect();
        CaptureError::Unsupported(format!("value expression {text:?}"))
    }

    /// Skips a type name after `::` or `AS`: words such as `timestamp
    /// without time zone`, an optional schema, `(n)` modifiers and `[]`.
    fn type_name(&mut self) -> Result<(), CaptureError> {
        self.identifier()?;
        if self.eat_punct('.') {
            self.identifier()?;
        }
        while self.peek().is_some_and(|t| {
            ["without", "with", "time", "zone", "precision", "varying"]
                .iter()
                .any(|w| t.is_keyword(w))
        }) {
            self.pos += 1;
        }
        if self.eat_punct('(') {
            while !self.eat_punct(')') {
                if self.next().is_none() {
                    return Err(self.syntax("expected ')'"));
                }
            }
        }
        while self.eat_punct('[') {
            self.expect_punct(']')?;
        }
        Ok(())
    }
}

fn is_clause_keyword(word: &str) -> bool {
    matches!(
        word,
        "set" | "values" | "default" | "overriding" | "select" | "on" | "returning"
    )
}

#[cfg(test)]
mod tests {
    use super::super::lexer::tokenize;
    use super::*;

    fn parse_sql(sql: &str) -> Result<Option<Statement>, CaptureError> {
        parse(&tokenize(sql).unwrap(), sql)
    }

    fn lit(text: &str) -> Value {
        Value::Literal(text.into())
    }

    #[test]
    fn insert_with_casts_and_conflict_clause() {
        let sql = "INSERT INTO public.\"workflow_runs\" AS r (id, elapsed_time, graph, created_at, error) \
                   VALUES ('a1'::uuid, -1.5, '{\"nodes\": []}'::text, CAST('2024-01-01' AS timestamp without time zone), NULL) \
                   ON CONFLICT (id) DO NOTHING RETURNING id";
        let statement = parse_sql(sql).unwrap().unwrap();
        assert_eq!(statement.operation, Operation::Insert);
        assert_eq!(
            statement.table,
            TableName {
                schema: Some("public".into()),
                name: "workflow_runs".into()
            }
        );
        assert_eq!(
            statement.rows[0],
            vec![
                ("id".into(), lit("a1")),
                ("elapsed_time".into(), lit("-1.5")),
                ("graph".into(), lit("{\"nodes\": []}")),
                ("created_at".into(), lit("2024-01-01")),
                ("error".into(), Value::Null),
            ]
        );
    }

    #[test]
    fn insert_with_several_rows_and_params() {
        let sql = "insert into t (a, b) values ($1, DEFAULT), ($2, now())";
        let statement = parse_sql(sql).unwrap().unwrap();
        assert_eq!(statement.rows.len(), 2);
        assert_eq!(statement.rows[0][1], ("b".into(), Value::Default));
        assert_eq!(statement.rows[1][0], ("a".into(), Value::Param(2)));
        assert_eq!(statement.rows[1][1], ("b".into(), Value::Now));
    }

    #[test]
    fn update_pinned_by_primary_key() {
        let sql = "UPDATE workflow_node_executions SET status='succeeded', elapsed_time=2.5 \
                   WHERE workflow_node_executions.id = 'n1'";
        let statement = parse_sql(sql).unwrap().unwrap();
        assert_eq!(statement.operation, Operation::Update);
        assert_eq!(statement.key, Some(("id".into(), lit("n1"))));
        assert_eq!(statement.rows[0][1], ("elapsed_time".into(), lit("2.5")));
    }

    #[test]
    fn other_statements_are_not_parsed() {
        assert_eq!(parse_sql("SELECT * FROM workflow_runs").unwrap(), None);
        assert_eq!(
            parse_sql("DELETE FROM workflow_runs WHERE id = '1'").unwrap(),
            None
        );
    }

    #[test]
    fn unsupported_forms_say_why() {
        let cases = [
            ("INSERT INTO t VALUES (1)", "column list"),
            ("INSERT INTO t (a) SELECT 1", "INSERT ... SELECT"),
            ("INSERT INTO t DEFAULT VALUES", "DEFAULT VALUES"),
            ("INSERT INTO t (a) VALUES (1 + 2)", "value expression"),
            ("INSERT INTO t (a) VALUES (lower('X'))", "value expression"),
            ("UPDATE t SET a = 1", "WHERE"),
            (
                "UPDATE t SET a = 1 WHERE status = 'x' AND id = '1'",
                "primary key",
            ),
            ("UPDATE t SET a = 1 FROM u WHERE t.id = u.id", "FROM"),
            ("UPDATE t SET a = 1 WHERE other.id = '1'", "another table"),
        ];
        for (sql, expected) in cases {
            let err = parse_sql(sql).unwrap_err().to_string();
            assert!(err.contains(expected), "{sql}: {err}");
        }
    }

    #[test]
    fn column_count_mismatch_names_the_row() {
        let err = parse_sql("INSERT INTO t (a, b) VALUES (1, 2), (3)").unwrap_err();
        assert_eq!(
            err,
            CaptureError::ColumnCountMismatch {
                row: 2,
                columns: 2,
                values: 1
            }
        );
    }
}
