fn main() {
    println!("graft");
}
