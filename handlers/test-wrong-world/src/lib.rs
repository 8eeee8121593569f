//! A test-only component that exports `handle` with the wrong type, so the
//! host's refusal of a component of the wrong world can be tested.

wit_bindgen::generate!({
    path: "wit",
    world: "wrong",
});

struct Wrong;

impl Guest for Wrong {
    fn handle(data: String) -> String {
        data
    }
}

export!(Wrong);
