use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// An arithmetic-expression grammar with comments, nesting, classes and every repetition form.
const EXPR: &str = r#"# expressions
root ::= expr ( ";" ws expr ){0,8}
expr ::= term ( ws [-+] ws term )*
term ::= factor ( ws [*/] ws factor )*
factor ::= number | "(" ws expr ws ")" | "-" factor
number ::= [0-9]+ ( "." [0-9]{1,6} )? ( [eE] [-+]? [0-9]{1,3} )?
ws ::= [ \t]{0,4}
"#;

#[test]
fn ordinary_grammars_pass() {
    for grammar in [
        EXPR,
        "root ::= \"yes.\" | \"no.\"",
        "root ::= [a-z]+ # a comment\n  # another\n",
        "root ::= ( \"a\" |\n  \"b\" )*\r\nother ::= root",
        "root ::= <[0]> | !<[5]> \"x\"",
        "root ::= \"\\x41\\u00e9\\U0001F600\\t\\n\\\\\\\"\\[\\]\\-\"",
        "root ::= [^\\x00-\\x1F] .",
        "root ::= \"a\"{3} \"b\"{1,} \"c\"{0,5} \"d\"{ 2 , 4 }",
        "root ::= \"\"",
        "root ::= item{0,2000}\nitem ::= [0-9]",
    ] {
        check(grammar).unwrap_or_else(|e| panic!("{grammar:?}: {e}"));
    }
}

#[test]
fn grammars_that_match_nothing_are_refused() {
    for grammar in [
        r"root ::= [^\x00-\U0010FFFF]",
        r#"root ::= "a" [^\x01-\U0010FFFF]"#,
        r#"root ::= "\x00""#,
        "root ::= [z-a]",
        "root ::= a\na ::= \"x\" a",
        "root ::= \"x\" root",
    ] {
        assert_eq!(check(grammar), Err(GrammarError::Empty), "{grammar:?}");
    }
    // An unusable alternative is fine while another one works.
    check(r#"root ::= [^\x00-\U0010FFFF] | "ok""#).unwrap();
}

#[test]
fn bad_repetitions_are_refused_before_llama_cpp_expands_them() {
    for grammar in [
        "root ::= \"a\"{5,2}",
        "root ::= \"a\"{2001}",
        "root ::= \"a\"{0,99999999999999999999999}",
        "root ::= \"a\"{1,3000}",
    ] {
        assert!(
            matches!(check(grammar), Err(GrammarError::Repetition { .. })),
            "{grammar:?}: {:?}",
            check(grammar)
        );
    }
    assert_eq!(
        check("root ::= ((\"abcdefgh\"{2000}){2000}){2000}"),
        Err(GrammarError::TooLarge)
    );
}

#[test]
fn structure_errors_are_named() {
    assert_eq!(check("other ::= \"a\""), Err(GrammarError::NoRoot));
    assert_eq!(
        check("root ::= missing"),
        Err(GrammarError::Undefined("missing".into()))
    );
    assert_eq!(
        check("root ::= root \"a\" | \"b\""),
        Err(GrammarError::LeftRecursive("root".into()))
    );
    assert!(matches!(
        check("root ::= a\na ::= \"x\"? b\nb ::= a \"y\" | \"z\""),
        Err(GrammarError::LeftRecursive(_))
    ));
    for looping in [
        "root ::= ( ws | \"a\" )*\nws ::= [ ]?",
        "root ::= ( \"a\"? )+",
        "root ::= ( \"\" ){2,}",
        "root ::= x*\nx ::= y\ny ::= \"b\" | \"\"",
    ] {
        assert!(
            matches!(check(looping), Err(GrammarError::EmptyLoop(_))),
            "{looping:?}: {:?}",
            check(looping)
        );
    }
    // Bounded repetitions of nullable things are finite, and fine.
    check("root ::= ( \"a\"? ){0,5} \"b\"").unwrap();
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(100), ")".repeat(100));
    assert!(matches!(check(&deep), Err(GrammarError::TooDeep { .. })));
    for bad in [
        "root ::= (",
        "root ::= \"a",
        "root ::= [a",
        "root ::= \"\\q\"",
        "root ::= \"\\x4\"",
        "root := \"a\"",
        "root ::= * \"a\"",
        "root ::= \"a\"{}",
        "root ::= \"a\"{1",
        "root ::= <abc",
        "::= \"a\"",
        "root ::= \"a\" )",
    ] {
        assert!(
            matches!(check(bad), Err(GrammarError::Syntax { .. })),
            "{bad:?}: {:?}",
            check(bad)
        );
    }
}

/// A seeded property test: random mutations of valid grammars and random text never panic, and
/// whatever passes stays within the bounds.
#[test]
fn mutated_grammars_never_panic() {
    let seeds = [
        EXPR,
        "root ::= ( \"a\" | [b-d]{1,3} )* \"e\"?",
        "root ::= x\nx ::= \"y\"",
    ];
    let alphabet = b"()[]{}\"\\|*+?.,:=^-#<>!\n 0123456789abxroot";
    let mut rng = StdRng::seed_from_u64(17);
    for case in 0..3000 {
        let mut bytes = seeds[case % seeds.len()].as_bytes().to_vec();
        for _ in 0..rng.gen_range(1..6) {
            let at = rng.gen_range(0..=bytes.len());
            match rng.gen_range(0..3) {
                0 if at < bytes.len() => {
                    bytes.remove(at);
                }
                1 if at < bytes.len() => bytes[at] = alphabet[rng.gen_range(0..alphabet.len())],
                _ => bytes.insert(at, alphabet[rng.gen_range(0..alphabet.len())]),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(facts) = check(&text) {
            assert!(facts.elements <= MAX_ELEMENTS, "{text:?}");
        }
    }
}
