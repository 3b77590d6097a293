use super::*;

/// The example from DESIGN.md, verbatim.
const DESIGN_EXAMPLE: &str = r#"description: Deploy the web front end
triggers:
  - github: { repo: acme/web, events: [push], branches: [main] }
  - gitlab: { project: acme/web, events: [push], branches: ["release/*"] }
  - azure_devops: { repository: web, events: [git.push], branches: [main] }
  - generic: {}                      # POST /hooks/generic/<pipeline>, HMAC-signed
variables: { NAMESPACE: web }
secrets: [REGISTRY_PASSWORD]         # names from the server's secret store
jobs:
  deploy:
    runs_on: [aks-prod]              # every label must be on the runner
    cluster: aks-prod                # a cluster the runner has configured (optional)
    environment: production          # optional: at most one running job per environment
    timeout: 30m
    steps:
      - checkout                     # clone the triggering repo at the triggering sha
      - name: Apply manifests
        kubectl: apply -f k8s/ -n ${NAMESPACE}
      - helm: upgrade --install web ./chart -n ${NAMESPACE} --set image.tag=${OUTPOST_SHA} --atomic --wait
      - run: ./smoke-test.sh
        timeout: 5m
      - name: Roll back
        when: on_failure             # on_success (default) | on_failure | always
        helm: rollback web -n ${NAMESPACE}
  notify:
    needs: [deploy]
    runs_on: [aks-prod]
    steps:
      - run: echo "deployed ${OUTPOST_SHA}"
"#;

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// Parses `yaml`, expecting an error at `line`:`column` whose message contains every one of
/// `needles`.
#[track_caller]
fn assert_error(yaml: &str, line: usize, column: usize, needles: &[&str]) -> PipelineError {
    let err = match parse(yaml) {
        Ok(def) => panic!("expected an error, but it parsed: {def:#?}"),
        Err(err) => err,
    };
    assert_eq!(
        (err.line, err.column),
        (line, column),
        "wrong position for: {err}"
    );
    for needle in needles {
        assert!(
            err.message.contains(needle),
            "message {:?} lacks {needle:?}",
            err.message
        );
    }
    err
}

/// A valid job around the given steps, for tests that are about steps.
fn with_steps(steps: &str) -> String {
    format!("jobs:\n  build:\n    steps:\n{steps}")
}

#[test]
fn design_example_parses_to_expected_structure() {
    let def = parse(DESIGN_EXAMPLE).unwrap();
    assert_eq!(def.description.as_deref(), Some("Deploy the web front end"));
    assert_eq!(
        def.triggers,
        vec![
            TriggerDef::Github {
                repo: "acme/web".into(),
                events: vec!["push".into()],
                branches: vec!["main".into()],
                tags: vec![],
                paths: vec![],
            },
            TriggerDef::Gitlab {
                project: "acme/web".into(),
                events: vec!["push".into()],
                branches: vec!["release/*".into()],
                tags: vec![],
                paths: vec![],
            },
            TriggerDef::AzureDevops {
                repository: "web".into(),
                events: vec!["git.push".into()],
                branches: vec!["main".into()],
                tags: vec![],
                paths: vec![],
            },
            TriggerDef::Generic {},
        ]
    );
    assert_eq!(
        def.variables,
        BTreeMap::from([("NAMESPACE".to_owned(), "web".to_owned())])
    );
    assert_eq!(def.secrets, vec!["REGISTRY_PASSWORD".to_owned()]);

    let names: Vec<&str> = def.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["deploy", "notify"]);

    let deploy = def.job("deploy").unwrap();
    assert_eq!(deploy.runs_on, vec!["aks-prod".to_owned()]);
    assert_eq!(deploy.cluster.as_deref(), Some("aks-prod"));
    assert_eq!(deploy.environment.as_deref(), Some("production"));
    assert_eq!(deploy.timeout_secs, 30 * 60);
    assert!(deploy.needs.is_empty());
    let expected_steps = vec![
        StepSpec {
            index: 0,
            name: "checkout".into(),
            action: StepAction::Checkout {
                path: None,
                depth: None,
                token_secret: None,
            },
            when: When::OnSuccess,
            timeout_secs: None,
        },
        StepSpec {
            index: 1,
            name: "Apply manifests".into(),
            action: StepAction::Kubectl {
                args: words("apply -f k8s/ -n ${NAMESPACE}"),
            },
            when: When::OnSuccess,
            timeout_secs: None,
        },
        StepSpec {
            index: 2,
            name: "helm upgrade --install web ./chart -n ${NAMESPACE} --set image.t…".into(),
            action: StepAction::Helm {
                args: words(
                    "upgrade --install web ./chart -n ${NAMESPACE} --set \
                     image.tag=${OUTPOST_SHA} --atomic --wait",
                ),
            },
            when: When::OnSuccess,
            timeout_secs: None,
        },
        StepSpec {
            index: 3,
            name: "run: ./smoke-test.sh".into(),
            action: StepAction::Run {
                script: "./smoke-test.sh".into(),
                shell: None,
            },
            when: When::OnSuccess,
            timeout_secs: Some(300),
        },
        StepSpec {
            index: 4,
            name: "Roll back".into(),
            action: StepAction::Helm {
                args: words("rollback web -n ${NAMESPACE}"),
            },
            when: When::OnFailure,
            timeout_secs: None,
        },
    ];
    assert_eq!(deploy.steps, expected_steps);

    let notify = def.job("notify").unwrap();
    assert_eq!(notify.needs, vec!["deploy".to_owned()]);
    assert_eq!(notify.timeout_secs, DEFAULT_JOB_TIMEOUT_SECS);
    assert_eq!(notify.steps.len(), 1);
    assert_eq!(
        notify.steps[0].name,
        r#"run: echo "deployed ${OUTPOST_SHA}""#
    );
    assert_eq!(
        notify.steps[0].action,
        StepAction::Run {
            script: r#"echo "deployed ${OUTPOST_SHA}""#.into(),
            shell: None,
        }
    );
    assert!(def.job("missing").is_none());
}

#[test]
fn parsed_definition_round_trips_through_json() {
    let def = parse(DESIGN_EXAMPLE).unwrap();
    let json = serde_json::to_value(&def).unwrap();
    assert_eq!(json["triggers"][2]["source"], "azure_devops");
    assert_eq!(json["triggers"][3]["source"], "generic");
    assert_eq!(json["jobs"][0]["steps"][1]["kind"], "kubectl");
    let back: PipelineDef = serde_json::from_value(json).unwrap();
    assert_eq!(back, def);
}

#[test]
fn example_files_parse() {
    let hello = parse(include_str!("../../../examples/hello.yaml")).unwrap();
    let names: Vec<&str> = hello.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["build", "deploy"]);
    assert_eq!(hello.job("deploy").unwrap().needs, ["build"]);
    for job in &hello.jobs {
        assert_eq!(job.runs_on, ["local"]);
        assert!(job.cluster.is_none());
        assert!(
            job.steps
                .iter()
                .all(|s| matches!(s.action, StepAction::Run { .. })),
            "hello.yaml must only use run steps so it works without a cluster"
        );
    }

    let deploy = parse(include_str!("../../../examples/deploy.yaml")).unwrap();
    assert_eq!(deploy, parse(DESIGN_EXAMPLE).unwrap());
}

#[test]
fn quotes_in_tool_arguments_are_respected_and_variables_are_left_alone() {
    let def = parse(&with_steps(
        "      - kubectl: annotate deploy/web note='two words' msg=\"a \\\"b\\\"\" -n ${NS}\n\
         \x20     - helm: ['upgrade', 'web', './chart', '--set', 'a=b c']\n",
    ))
    .unwrap();
    let steps = &def.jobs[0].steps;
    assert_eq!(
        steps[0].action,
        StepAction::Kubectl {
            args: vec![
                "annotate".into(),
                "deploy/web".into(),
                "note=two words".into(),
                "msg=a \"b\"".into(),
                "-n".into(),
                "${NS}".into(),
            ]
        }
    );
    assert_eq!(
        steps[1].action,
        StepAction::Helm {
            args: vec![
                "upgrade".into(),
                "web".into(),
                "./chart".into(),
                "--set".into(),
                "a=b c".into()
            ]
        }
    );
    assert_eq!(steps[1].name, "helm upgrade web ./chart --set 'a=b c'");
}

#[test]
fn step_forms_and_defaults() {
    let long = "x".repeat(100);
    let def = parse(&with_steps(&format!(
        "      - run: |\n\
         \x20         \n\
         \x20         echo {long}\n\
         \x20         echo second\n\
         \x20       shell: sh -e {{0}}\n\
         \x20       when: always\n\
         \x20       timeout: 1h30m\n\
         \x20     - checkout: {{path: sub/dir, depth: 1}}\n\
         \x20     - checkout: {{}}\n\
         \x20     - checkout:\n"
    )))
    .unwrap();
    let steps = &def.jobs[0].steps;
    let StepAction::Run { script, shell } = &steps[0].action else {
        panic!("not a run step: {:?}", steps[0]);
    };
    assert!(script.contains("echo second"));
    assert_eq!(shell.as_deref(), Some("sh -e {0}"));
    assert_eq!(steps[0].when, When::Always);
    assert_eq!(steps[0].timeout_secs, Some(5400));
    // The name takes the first non-blank line and cuts the command to 60 characters.
    assert_eq!(steps[0].name, format!("run: echo {}…", "x".repeat(54)));
    assert_eq!(
        steps[1].action,
        StepAction::Checkout {
            path: Some("sub/dir".into()),
            depth: Some(1),
            token_secret: None,
        }
    );
    assert_eq!(steps[1].name, "checkout");
    for step in &steps[2..] {
        assert_eq!(
            step.action,
            StepAction::Checkout {
                path: None,
                depth: None,
                token_secret: None,
            }
        );
    }
    let indexes: Vec<u32> = steps.iter().map(|s| s.index).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
}

#[test]
fn checkout_token_names_a_listed_secret() {
    let def = parse(
        "secrets: [GIT_TOKEN, OTHER]\n\
         jobs:\n  a:\n    steps:\n\
         \x20     - checkout: {token: GIT_TOKEN}\n\
         \x20     - checkout:\n          path: src\n          depth: 5\n          token: OTHER\n",
    )
    .unwrap();
    let steps = &def.jobs[0].steps;
    assert_eq!(
        steps[0].action,
        StepAction::Checkout {
            path: None,
            depth: None,
            token_secret: Some("GIT_TOKEN".into()),
        }
    );
    assert_eq!(
        steps[1].action,
        StepAction::Checkout {
            path: Some("src".into()),
            depth: Some(5),
            token_secret: Some("OTHER".into()),
        }
    );
    // The wire form names the secret, never a value.
    let json = serde_json::to_value(&steps[0]).unwrap();
    assert_eq!(json["token_secret"], "GIT_TOKEN");
    // Without a token the field is left out of the JSON altogether.
    let plain = parse(&with_steps("      - checkout\n")).unwrap();
    let json = serde_json::to_value(&plain.jobs[0].steps[0]).unwrap();
    assert!(json.get("token_secret").is_none(), "{json}");
}

#[test]
fn rejects_a_checkout_token_that_is_not_a_listed_secret() {
    assert_error(
        &with_steps("      - checkout: {token: GIT_TOKEN}\n"),
        4,
        27,
        &[
            "`token` names secret `GIT_TOKEN`",
            "top-level `secrets:`",
            "secrets: [GIT_TOKEN]",
        ],
    );
    assert_error(
        "secrets: [OTHER]\njobs:\n  a:\n    steps:\n      - checkout:\n          token: GIT_TOKEN\n",
        6,
        18,
        &["`GIT_TOKEN`", "does not list it"],
    );
    assert_error(
        "secrets: [GIT_TOKEN]\njobs:\n  a:\n    steps:\n      - checkout: {token: git-token}\n",
        5,
        27,
        &["not a valid secret name"],
    );
    assert_error(
        "secrets: [GIT_TOKEN]\njobs:\n  a:\n    steps:\n      - checkout: {token: [GIT_TOKEN]}\n",
        5,
        27,
        &["`token` must be text"],
    );
    assert_error(
        &with_steps("      - checkout: {tokne: GIT_TOKEN}\n"),
        4,
        20,
        &["unknown key `tokne`", "did you mean `token`?"],
    );
}

#[test]
fn repository_is_the_default_clone_url() {
    let def = parse(
        "repository: https://dev.azure.com/acme/web/_git/web\njobs: {a: {steps: [checkout]}}\n",
    )
    .unwrap();
    assert_eq!(
        def.repository.as_deref(),
        Some("https://dev.azure.com/acme/web/_git/web")
    );
    for url in [
        "file:///srv/git/web.git",
        "git@github.com:acme/web.git",
        "https://acme@dev.azure.com/acme/web/_git/web",
    ] {
        let def = parse(&format!(
            "repository: {url}\njobs: {{a: {{steps: [checkout]}}}}\n"
        ))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(def.repository.as_deref(), Some(url));
    }
    assert_eq!(parse(DESIGN_EXAMPLE).unwrap().repository, None);

    // Definitions stored before `repository` existed still load.
    let mut json = serde_json::to_value(parse(DESIGN_EXAMPLE).unwrap()).unwrap();
    assert!(json.get("repository").is_none(), "{json}");
    json.as_object_mut().unwrap().remove("repository");
    let back: PipelineDef = serde_json::from_value(json).unwrap();
    assert_eq!(back.repository, None);
}

#[test]
fn rejects_bad_repositories() {
    assert_error(
        "repository: https://x-access-token:ghp_abc@github.com/acme/web.git\njobs: {a: {steps: [checkout]}}\n",
        1,
        13,
        &[
            "must not contain a password or token",
            "checkout: {token: GIT_TOKEN}",
        ],
    );
    assert_error(
        "repository: https://github.com/acme/web two\njobs: {a: {steps: [checkout]}}\n",
        1,
        13,
        &["contains a space"],
    );
    assert_error(
        "repository: [a]\njobs: {a: {steps: [checkout]}}\n",
        1,
        13,
        &["`repository` must be text"],
    );
    assert_error(
        "repository: ' '\njobs: {a: {steps: [checkout]}}\n",
        1,
        13,
        &["`repository` is blank"],
    );
}

#[test]
fn runs_on_and_needs_accept_a_single_word() {
    let def = parse(
        "jobs:\n  a:\n    runs_on: local\n    steps: [checkout]\n  b:\n    needs: a\n    steps: [checkout]\n",
    )
    .unwrap();
    assert_eq!(def.jobs[0].runs_on, ["local"]);
    assert_eq!(def.jobs[1].needs, ["a"]);
    assert!(def.jobs[1].runs_on.is_empty());
}

#[test]
fn variables_take_the_text_of_any_scalar() {
    let def = parse(
        "variables:\n  A: 1.10\n  B: true\n  C: \"007\"\n  D: 0x1F\n  _e: ''\njobs:\n  a:\n    steps: [checkout]\n",
    )
    .unwrap();
    let expected = [
        ("A", "1.10"),
        ("B", "true"),
        ("C", "007"),
        ("D", "0x1F"),
        ("_e", ""),
    ];
    assert_eq!(
        def.variables,
        expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    );
}

#[test]
fn anchors_aliases_and_merge_keys_work() {
    let def = parse(
        "jobs:\n\
         \x20 a: &base\n\
         \x20   runs_on: [local]\n\
         \x20   timeout: 90\n\
         \x20   steps: [checkout]\n\
         \x20 b:\n\
         \x20   <<: *base\n\
         \x20   timeout: 2m\n\
         \x20   needs: [a]\n",
    )
    .unwrap();
    let b = def.job("b").unwrap();
    assert_eq!(b.runs_on, ["local"]);
    assert_eq!(b.timeout_secs, 120);
    assert_eq!(def.job("a").unwrap().timeout_secs, 90);
    assert_eq!(b.steps.len(), 1);
}

#[test]
fn topological_order_puts_needs_first_and_otherwise_keeps_yaml_order() {
    let def = parse(
        "jobs:\n\
         \x20 notify: {needs: [deploy, test], steps: [checkout]}\n\
         \x20 deploy: {needs: [build], steps: [checkout]}\n\
         \x20 lint: {steps: [checkout]}\n\
         \x20 build: {steps: [checkout]}\n\
         \x20 test: {needs: [build], steps: [checkout]}\n",
    )
    .unwrap();
    let order: Vec<&str> = def
        .topological_order()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["lint", "build", "deploy", "test", "notify"]);
}

#[test]
fn durations() {
    assert_eq!(duration_secs("30s"), Some(30));
    assert_eq!(duration_secs("5m"), Some(300));
    assert_eq!(duration_secs("2h"), Some(7200));
    assert_eq!(duration_secs("1h30m"), Some(5400));
    assert_eq!(duration_secs("1h2m3s"), Some(3723));
    assert_eq!(duration_secs("45"), Some(45));
    for bad in [
        "",
        "m",
        "1x",
        "1.5h",
        "30m1h",
        "1m1m",
        "1h30",
        "h1",
        "-5s",
        "99999999999999999999h",
    ] {
        assert_eq!(duration_secs(bad), None, "{bad:?} should not parse");
    }
}

#[test]
fn pipeline_names() {
    for good in ["a", "web", "web-front-2", "0day", &"a".repeat(63)] {
        assert_eq!(validate_name(good), Ok(()), "{good:?}");
    }
    for bad in [
        "",
        "Web",
        "-web",
        "web_front",
        "web front",
        "wéb",
        &"a".repeat(64),
    ] {
        let err = validate_name(bad).unwrap_err();
        assert!(err.contains("lowercase"), "{bad:?}: {err}");
    }
}

// ---------------------------------------------------------------------------
// Rejections: each names the line and column of the node at fault.
// ---------------------------------------------------------------------------

#[test]
fn rejects_invalid_yaml_syntax() {
    assert_error(
        "jobs:\n  a:\n    steps: [checkout\n  b: 1\n",
        4,
        4,
        &["invalid YAML"],
    );
    assert_error("jobs: \"unterminated\n", 1, 7, &["invalid YAML", "quoted"]);
}

#[test]
fn rejects_a_document_that_is_not_a_mapping() {
    assert_error("- a\n- b\n", 1, 1, &["mapping", "a list"]);
    assert_error("", 1, 1, &["empty", "jobs"]);
    assert_error("# only a comment\n", 1, 1, &["empty"]);
}

#[test]
fn rejects_several_documents() {
    assert_error(
        "jobs: {a: {steps: [checkout]}}\n---\njobs: {}\n",
        2,
        1,
        &["one YAML document"],
    );
}

#[test]
fn rejects_unknown_top_level_key() {
    let err = assert_error(
        "description: x\nstages: [a]\njobs:\n  a:\n    steps: [checkout]\n",
        2,
        1,
        &["unknown key `stages`", "`jobs`", "`variables`"],
    );
    assert!(err.to_string().starts_with("line 2, column 1: "));
}

#[test]
fn rejects_unknown_job_key_with_a_suggestion() {
    assert_error(
        "jobs:\n  a:\n    runs-on: [x]\n    steps: [checkout]\n",
        3,
        5,
        &[
            "unknown key `runs-on`",
            "in job `a`",
            "did you mean `runs_on`?",
        ],
    );
}

#[test]
fn rejects_unknown_step_key() {
    assert_error(
        &with_steps("      - run: make\n        env: {A: b}\n"),
        5,
        9,
        &["unknown key `env`", "in a step", "`run`", "`when`"],
    );
}

#[test]
fn rejects_two_action_keys() {
    assert_error(
        &with_steps("      - run: make\n        kubectl: get pods\n"),
        5,
        9,
        &["both `run` and `kubectl`"],
    );
}

#[test]
fn rejects_a_step_without_an_action() {
    assert_error(
        &with_steps("      - checkout\n      - name: nothing\n        when: always\n"),
        5,
        9,
        &["does nothing", "`run`"],
    );
    assert_error(
        &with_steps("      - make test\n"),
        4,
        9,
        &["`make test`", "- run: make test"],
    );
}

#[test]
fn rejects_wrong_types_where_they_are() {
    assert_error(
        "jobs:\n  a:\n    steps: 3\n",
        3,
        12,
        &["`steps`", "list", "a number"],
    );
    assert_error("jobs: [a, b]\n", 1, 7, &["`jobs`", "mapping", "a list"]);
    assert_error(
        "jobs:\n  a:\n    runs_on: {x: y}\n    steps: [checkout]\n",
        3,
        14,
        &["`runs_on`", "a mapping"],
    );
    assert_error(
        &with_steps("      - run: [make]\n"),
        4,
        14,
        &["`run` must be text", "a list"],
    );
}

#[test]
fn rejects_missing_or_empty_jobs_and_steps() {
    assert_error("description: x\n", 1, 1, &["no `jobs`"]);
    assert_error("jobs: {}\n", 1, 7, &["`jobs` is empty"]);
    assert_error("jobs:\n", 1, 1, &["`jobs` is empty"]);
    assert_error(
        "jobs:\n  a:\n    runs_on: [x]\n",
        2,
        3,
        &["job `a` has no `steps`"],
    );
    assert_error("jobs:\n  a:\n    steps: []\n", 3, 12, &["empty"]);
}

#[test]
fn rejects_unknown_need() {
    assert_error(
        "jobs:\n  build:\n    steps: [checkout]\n  deploy:\n    needs: [build, tset]\n    steps: [checkout]\n",
        5,
        20,
        &["`tset`", "no such job", "build, deploy"],
    );
}

#[test]
fn rejects_a_job_needing_itself() {
    assert_error(
        "jobs:\n  a:\n    needs:\n      - a\n    steps: [checkout]\n",
        4,
        9,
        &["cannot need itself"],
    );
}

#[test]
fn rejects_a_cycle_and_shows_its_path() {
    assert_error(
        "jobs:\n\
         \x20 a:\n    needs: [b]\n    steps: [checkout]\n\
         \x20 b:\n    needs: [c]\n    steps: [checkout]\n\
         \x20 c:\n    needs: [a]\n    steps: [checkout]\n",
        3,
        13,
        &["cycle", "a -> b -> c -> a"],
    );
    // A cycle that the search reaches from outside still names only the jobs in it.
    assert_error(
        "jobs:\n\
         \x20 x: {needs: [b], steps: [checkout]}\n\
         \x20 a: {needs: [b], steps: [checkout]}\n\
         \x20 b: {needs: [a], steps: [checkout]}\n",
        4,
        15,
        &["b -> a -> b"],
    );
}

#[test]
fn rejects_bad_durations() {
    assert_error(
        "jobs:\n  a:\n    timeout: 30 minutes\n    steps: [checkout]\n",
        3,
        14,
        &["`timeout`", "duration", "`30 minutes`"],
    );
    assert_error(
        &with_steps("      - run: make\n        timeout: 0s\n"),
        5,
        18,
        &["longer than zero"],
    );
    assert_error(
        "jobs:\n  a:\n    timeout: 200h\n    steps: [checkout]\n",
        3,
        14,
        &["at most 168h"],
    );
    assert_error(
        "jobs:\n  a:\n    timeout: 1.5\n    steps: [checkout]\n",
        3,
        14,
        &["duration", "a number"],
    );
}

#[test]
fn rejects_bad_job_names() {
    assert_error(
        "jobs:\n  ok_job:\n    steps: [checkout]\n  Deploy:\n    steps: [checkout]\n",
        4,
        3,
        &["`Deploy`", "not a valid job name", "lowercase"],
    );
    assert_error(
        &format!("jobs:\n  {}:\n    steps: [checkout]\n", "a".repeat(64)),
        2,
        3,
        &["not a valid job name"],
    );
}

#[test]
fn rejects_unbalanced_quotes() {
    assert_error(
        &with_steps("      - name: annotate\n        kubectl: annotate pod x note='oops\n"),
        5,
        18,
        &["`kubectl`", "unbalanced quote"],
    );
}

#[test]
fn rejects_a_repeated_tool_name() {
    assert_error(
        &with_steps("      - kubectl: kubectl apply -f k8s/\n"),
        4,
        18,
        &["do not repeat `kubectl`", "`kubectl: apply -f k8s/`"],
    );
    assert_error(
        &with_steps("      - helm: helm list\n"),
        4,
        15,
        &["do not repeat `helm`"],
    );
    assert_error(
        &with_steps("      - kubectl: get pods | grep web\n"),
        4,
        18,
        &["`|`", "`run:`"],
    );
}

#[test]
fn rejects_bad_variable_names_and_values() {
    assert_error(
        "variables:\n  GOOD: 1\n  1BAD: x\njobs: {a: {steps: [checkout]}}\n",
        3,
        3,
        &["`1BAD`", "not a valid variable name"],
    );
    assert_error(
        "variables:\n  LIST: [a, b]\njobs: {a: {steps: [checkout]}}\n",
        2,
        9,
        &["`LIST`", "a list"],
    );
    assert_error(
        "variables:\n  EMPTY:\njobs: {a: {steps: [checkout]}}\n",
        2,
        3,
        &["no value"],
    );
    assert_error(
        "secrets: [OK, not-ok]\njobs: {a: {steps: [checkout]}}\n",
        1,
        15,
        &["`not-ok`", "not a valid secret name"],
    );
}

#[test]
fn rejects_bad_triggers() {
    assert_error(
        "triggers:\n  - github: {events: [push]}\njobs: {a: {steps: [checkout]}}\n",
        2,
        5,
        &["`github` trigger needs `repo`"],
    );
    assert_error(
        "triggers:\n  - bitbucket: {repo: x}\njobs: {a: {steps: [checkout]}}\n",
        2,
        5,
        &["unknown key `bitbucket`", "`azure_devops`"],
    );
    assert_error(
        "triggers:\n  - github: {repo: a/b, branch: [main]}\njobs: {a: {steps: [checkout]}}\n",
        2,
        25,
        &["unknown key `branch`", "did you mean `branches`?"],
    );
    assert_error(
        "triggers:\n  - github:\n    repo: a/b\njobs: {a: {steps: [checkout]}}\n",
        3,
        5,
        &["`repo` belongs inside"],
    );
}

#[test]
fn rejects_unknown_trigger_events_and_bad_globs() {
    assert_error(
        "triggers:\n  - github: {repo: a/b, events: [push, pushh]}\njobs: {a: {steps: [checkout]}}\n",
        2,
        40,
        &["`pushh`", "`github` trigger", "`pull_request`"],
    );
    assert_error(
        "triggers:\n  - azure_devops: {repository: web, events: [pull_request.created]}\njobs: {a: {steps: [checkout]}}\n",
        2,
        46,
        &["`pull_request.created`", "`git.pullrequest.created`"],
    );
    assert_error(
        "triggers:\n  - gitlab: {project: a/b, branches: [\"release/[\"]}\njobs: {a: {steps: [checkout]}}\n",
        2,
        39,
        &["`branches`", "`release/[`"],
    );
    // GitLab's own event names and the short forms are both accepted.
    let def = parse(
        "triggers:\n  - gitlab: {project: a/b, events: [Push Hook, tag_push, Merge Request Hook]}\n  - github: {repo: a/b, branches: [\"release/**\", \"!release/**-rc\"], paths: [\"**.md\"]}\njobs: {a: {steps: [checkout]}}\n",
    )
    .unwrap();
    assert_eq!(def.triggers.len(), 2);
}

#[test]
fn rejects_other_step_mistakes() {
    assert_error(
        &with_steps("      - run: make\n        when: sometimes\n"),
        5,
        15,
        &["`when`", "`on_failure`", "`sometimes`"],
    );
    assert_error(
        &with_steps("      - run: make\n        shell: bash -e\n"),
        5,
        16,
        &["`{0}`"],
    );
    assert_error(
        &with_steps("      - kubectl: get pods\n        shell: bash {0}\n"),
        5,
        9,
        &["only applies to `run`"],
    );
    assert_error(
        &with_steps("      - checkout: {path: ../outside}\n"),
        4,
        26,
        &["inside the job's workspace"],
    );
}

#[test]
fn rejects_duplicate_keys() {
    assert_error(
        "jobs:\n  a:\n    steps: [checkout]\n  a:\n    steps: [checkout]\n",
        4,
        3,
        &["duplicate key `a`", "line 2"],
    );
}

#[test]
fn rejects_oversized_documents() {
    let mut yaml = String::from("jobs:\n  a:\n    steps:\n");
    while yaml.len() <= MAX_YAML_BYTES {
        yaml.push_str("      - run: echo padding padding padding padding padding padding\n");
    }
    assert_error(&yaml, 1, 1, &["1 MiB"]);
}

#[test]
fn rejects_alias_bombs() {
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..8 {
        let p = i - 1;
        yaml.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let err = parse(&yaml).unwrap_err();
    assert!(err.message.contains("aliases expand"), "{err}");
}

#[test]
fn rejects_deep_nesting() {
    let yaml = format!("jobs: {}{}\n", "[".repeat(70), "]".repeat(70));
    let err = parse(&yaml).unwrap_err();
    assert!(err.message.contains("nests more than"), "{err}");
}

#[test]
fn rejects_custom_tags() {
    assert_error(
        "jobs:\n  a:\n    steps: !reference [.x, steps]\n",
        3,
        12,
        &["`!reference`", "not supported"],
    );
}

#[test]
fn a_cluster_name_no_runner_could_have_is_an_error() {
    assert_error(
        "jobs:\n  deploy:\n    cluster: aks prod\n    steps:\n      - run: true\n",
        3,
        14,
        &["`aks prod` is not a valid cluster name", "[clusters.NAME]"],
    );
}
